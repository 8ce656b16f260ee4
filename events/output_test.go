package events_test

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/imagepipe/imagepipe/events"
)

func TestOutputKeysFollowTheDocumentedExamples(t *testing.T) {
	cases := []struct{ got, want string }{
		{events.OutputKey("", "disks/win11.vhdx", "raw"), "disks/win11.vhdx.raw"},
		{events.OutputKey("converted/", "disks/win11.vhdx", "qcow2"), "converted/disks/win11.vhdx.qcow2"},
		{events.OVADiskKey("", "apps/web.ova", "web-disk1.vmdk", "raw"), "apps/web.ova/.ova-disks/web-disk1.vmdk.raw"},
		{events.OVADiskKey("converted/", "apps/web.ova", "disk.vmdk", "raw"), "converted/apps/web.ova/.ova-disks/disk.vmdk.raw"},
	}
	for _, c := range cases {
		if c.got != c.want {
			t.Errorf("key %q, want %q", c.got, c.want)
		}
	}
}

func TestHasReservedSegmentFindsOnlyAWholeSegment(t *testing.T) {
	cases := map[string]bool{
		".ova-disks":                    true,
		".ova-disks/y.vmdk":             true,
		"x/.ova-disks/y.vmdk":           true,
		"apps/web.ova/.ova-disks/":      true,
		"x/.ova-disksy/y.vmdk":          false,
		"x/a.ova-disks/y.vmdk":          false,
		"x/.ova-disks.vmdk":             false,
		"apps/web.ova/disk.vmdk":        false,
		"apps/web.ova/ova-disks/d.vmdk": false,
	}
	for key, want := range cases {
		if got := events.HasReservedSegment(key); got != want {
			t.Errorf("HasReservedSegment(%q) = %v, want %v", key, got, want)
		}
	}
}

// The pair that used to collide: a plain upload inside an OVA's "folder"
// and the OVA's own disk of the same name.
func TestPlainUploadAndOVADiskOfTheSameNameGetDifferentKeys(t *testing.T) {
	plain := events.OutputKey("", "apps/web.ova/disk.vmdk", "raw")
	ova := events.OVADiskKey("", "apps/web.ova", "disk.vmdk", "raw")
	if plain == ova {
		t.Fatalf("both outputs are %q", plain)
	}
	// The only plain upload that would produce the OVA's key has the
	// reserved segment, which ingest refuses.
	forged := strings.TrimSuffix(ova, ".raw")
	if events.OutputKey("", forged, "raw") != ova || !events.HasReservedSegment(forged) {
		t.Errorf("the forging key %q is not caught by HasReservedSegment", forged)
	}
}

// keyAlphabet leans on the characters that matter to the rule: "/", ".",
// the letters of the reserved segment, and the format suffixes.
var keyAlphabet = []string{"/", ".", "-", "o", "v", "a", "d", "i", "s", "k", "r", "w", "q", "c", "2", "é", ".ova", ".ova-disks", ".raw", ".qcow2"}

func randomKey(r *rand.Rand, maxParts int) string {
	var b strings.Builder
	for range 1 + r.IntN(maxParts) {
		b.WriteString(keyAlphabet[r.IntN(len(keyAlphabet))])
	}
	return b.String()
}

// randomMember is a member name the archive reader accepts: no "/".
func randomMember(r *rand.Rand) string {
	for {
		m := randomKey(r, 6)
		if !strings.Contains(m, "/") {
			return m
		}
	}
}

// TestNoPlainOutputEverEqualsAnOVAOutput checks the collision-free rule on
// many keys built from the characters that could break it: for every plain
// key ingest accepts (no reserved segment), its output never equals an OVA
// disk's output, whatever the OVA key, member and formats.
func TestNoPlainOutputEverEqualsAnOVAOutput(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	formats := []string{"raw", "qcow2"}
	prefixes := []string{"", "converted/", "out/.ova/"}
	checked := 0
	for range 200000 {
		prefix := prefixes[r.IntN(len(prefixes))]
		ovaKey, member := randomKey(r, 8), randomMember(r)
		ova := events.OVADiskKey(prefix, ovaKey, member, formats[r.IntN(2)])
		// A plain key chosen to be as close as possible to the OVA output,
		// plus a random one.
		for _, plainKey := range []string{
			strings.TrimSuffix(strings.TrimSuffix(strings.TrimPrefix(ova, prefix), ".raw"), ".qcow2"),
			ovaKey + "/" + member,
			randomKey(r, 12),
		} {
			if events.HasReservedSegment(plainKey) {
				continue // ingest refuses it
			}
			checked++
			for _, f := range formats {
				if plain := events.OutputKey(prefix, plainKey, f); plain == ova {
					t.Fatalf("plain upload %q and member %q of OVA %q both write %q", plainKey, member, ovaKey, plain)
				}
			}
		}
	}
	if checked < 100000 {
		t.Fatalf("only %d accepted plain keys were checked", checked)
	}
}

func TestTwoOVADisksNeverShareAKey(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	seen := map[string]string{}
	for range 50000 {
		ovaKey, member := randomKey(r, 6), randomMember(r)
		who := ovaKey + "\x00" + member
		k := events.OVADiskKey("", ovaKey, member, "raw")
		if prev, ok := seen[k]; ok && prev != who {
			t.Fatalf("%q and %q both write %q", prev, who, k)
		}
		seen[k] = who
	}
}

func TestErrorReportKeyOfAShortKeyIsPlain(t *testing.T) {
	key, shortened := events.ErrorReportKey("disks/a.vhdx")
	if key != "errors/disks/a.vhdx.error.json" || shortened {
		t.Errorf("ErrorReportKey = %q, %v", key, shortened)
	}
	// The longest key whose report still fits is not shortened.
	long := strings.Repeat(strings.Repeat("k", 199)+"/", 6)
	long = long[:events.MaxKeyLen-len("errors/")-len(".error.json")]
	if key, shortened := events.ErrorReportKey(long); len(key) != events.MaxKeyLen || shortened {
		t.Errorf("a report key of exactly %d bytes was shortened to %d bytes", events.MaxKeyLen, len(key))
	}
}

// Keys of 1007 to 1018 bytes are the ones ingest accepts whose plain report
// key would not fit; longer ones are covered too.
func TestErrorReportKeysFitS3AndStayDistinctAndValidUTF8(t *testing.T) {
	seen := map[string]string{}
	pieces := []string{"a", "é", "日", "🙂", "/", "abcdefghi/", "日本語/"}
	for n := 990; n <= events.MaxKeyLen+8; n++ {
		for i, p := range pieces {
			// Multi-byte characters at every offset around the cut.
			key := strings.Repeat("x", i) + strings.Repeat(p, n)
			key = cutToBytes(key, n)
			rk, shortened := events.ErrorReportKey(key)
			if len(rk) > events.MaxKeyLen {
				t.Fatalf("key of %d bytes: report key of %d bytes", len(key), len(rk))
			}
			if !utf8.ValidString(rk) {
				t.Fatalf("key of %d bytes: report key %q is not valid UTF-8", len(key), rk)
			}
			if !strings.HasPrefix(rk, events.ErrorPrefix) || !strings.HasSuffix(rk, ".error.json") {
				t.Fatalf("report key %q is not under %s or lacks .error.json", rk, events.ErrorPrefix)
			}
			if seg := lastSegment(rk); len(seg) > events.MaxSegmentLen {
				t.Fatalf("key of %d bytes: report key's last segment is %d bytes", len(key), len(seg))
			}
			wantShort := len(events.ErrorPrefix)+len(key)+len(".error.json") > events.MaxKeyLen ||
				len(lastSegment(key))+len(".error.json") > events.MaxSegmentLen
			if shortened != wantShort {
				t.Fatalf("key of %d bytes: shortened = %v", len(key), shortened)
			}
			if prev, ok := seen[rk]; ok && prev != key {
				t.Fatalf("keys %q and %q share report key %q", prev, key, rk)
			}
			seen[rk] = key
		}
	}
}

// MinIO keeps each segment of a key as a file name, of at most 255 bytes:
// a short key whose last segment is near that limit still gets a report.
func TestErrorReportOfALongLastSegmentFitsMinIO(t *testing.T) {
	key := "disks/" + strings.Repeat("n", 250) + ".vhdx"
	rk, shortened := events.ErrorReportKey(key)
	if !shortened || len(lastSegment(rk)) > events.MaxSegmentLen || !strings.HasPrefix(rk, "errors/disks/nnn") {
		t.Errorf("ErrorReportKey = %q (last segment %d bytes), %v", rk, len(lastSegment(rk)), shortened)
	}
}

func lastSegment(key string) string { return key[strings.LastIndexByte(key, '/')+1:] }

func TestLongKeysDifferingOnlyPastTheCutGetDifferentReports(t *testing.T) {
	base := strings.Repeat("d/", 505)
	a, _ := events.ErrorReportKey(base + "a.vhdx")
	b, _ := events.ErrorReportKey(base + "b.vhdx")
	if a == b {
		t.Fatalf("both reports at %q", a)
	}
}

// cutToBytes shortens s to at most n bytes at a character boundary.
func cutToBytes(s string, n int) string {
	for len(s) > n {
		_, size := utf8.DecodeLastRuneInString(s)
		s = s[:len(s)-size]
	}
	return s
}

func ExampleErrorReportKey() {
	key, shortened := events.ErrorReportKey("disks/win11.vhdx")
	fmt.Println(key, shortened)
	// Output: errors/disks/win11.vhdx.error.json false
}
