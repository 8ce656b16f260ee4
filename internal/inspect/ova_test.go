package inspect

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/imagepipe/imagepipe/internal/inspect/ovatest"
)

const pib = int64(1) << 50

func disk(name string, n int) ovatest.Member {
	return ovatest.Member{Name: name, Body: bytes.Repeat([]byte{byte(len(name))}, n)}
}

// withOVF puts a descriptor declaring files before members.
func withOVF(files []ovatest.Member, members ...ovatest.Member) []ovatest.Member {
	return append([]ovatest.Member{{Name: "app.ovf", Body: ovatest.OVF(files...)}}, members...)
}

func TestOVAReaderFindsEveryMemberAndItsBytes(t *testing.T) {
	d1, d2 := disk("app-disk1.vmdk", 3000), disk("app-disk2.vmdk", 512)
	nvram := ovatest.Member{Name: "app.nvram", Body: []byte("nvram")}
	files := []ovatest.Member{d1, nvram, d2}
	b := ovatest.Build(t, append(withOVF(files, files...),
		ovatest.Member{Name: "app.mf", Body: ovatest.Manifest(files, nil)},
		ovatest.Member{Name: "app.cert", Body: []byte("-----BEGIN CERTIFICATE-----")})...)

	a, err := ReadOVA(bytes.NewReader(b), int64(len(b)), Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if a.Descriptor != "app.ovf" || a.Manifest != "app.mf" || len(a.Members) != 6 {
		t.Fatalf("descriptor %q manifest %q members %+v", a.Descriptor, a.Manifest, a.Members)
	}
	if len(a.Disks) != 2 || a.Disks[0].Name != d1.Name || a.Disks[1].Name != d2.Name {
		t.Fatalf("disks %+v, want %s and %s", a.Disks, d1.Name, d2.Name)
	}
	for i, want := range []ovatest.Member{d1, d2} {
		m := a.Disks[i]
		if got := b[m.Offset : m.Offset+m.Size]; !bytes.Equal(got, want.Body) {
			t.Errorf("disk %s: bytes at offset %d differ from its contents", m.Name, m.Offset)
		}
	}
	if err := a.CheckManifest(context.Background(), bytes.NewReader(b)); err != nil {
		t.Fatalf("manifest of a good OVA: %v", err)
	}
}

// ovaCase is an archive the reader must refuse, and the rule it names.
type ovaCase struct {
	name  string
	build func(t *testing.T) []byte
	rule  string
	lim   Limits
}

func ovaCases() []ovaCase {
	d := disk("disk.vmdk", 1024)
	plain := func(members ...ovatest.Member) func(t *testing.T) []byte {
		return func(t *testing.T) []byte { return ovatest.Build(t, members...) }
	}
	// declared builds an OVA whose descriptor declares every member after
	// it, so that only the rule under test can refuse it.
	declared := func(members ...ovatest.Member) func(t *testing.T) []byte {
		return plain(withOVF(members, members...)...)
	}
	many := func(n int, at int, bad ovatest.Member) []ovatest.Member {
		var ms []ovatest.Member
		for i := 2; i <= n; i++ {
			m := ovatest.Member{Name: fmt.Sprintf("file%03d.txt", i), Body: []byte("x")}
			if i == at {
				m = bad
			}
			ms = append(ms, m)
		}
		return ms
	}
	return []ovaCase{
		{name: "GNUSparseMemberClaimingAPetabyte", rule: "ova-sparse",
			build: declared(ovatest.Member{Name: "disk.vmdk", Sparse: pib, SparseForm: ovatest.SparseGNU})},
		{name: "PAXSparseMemberClaimingAPetabyte", rule: "ova-sparse",
			build: declared(ovatest.Member{Name: "disk.vmdk", Sparse: pib, SparseForm: ovatest.SparsePAX})},
		{name: "Symlink", rule: "ova-member",
			build: declared(d, ovatest.Member{Name: "disk2.vmdk", Type: tar.TypeSymlink, Link: "/etc/shadow"})},
		{name: "HardLink", rule: "ova-member",
			build: declared(d, ovatest.Member{Name: "disk2.vmdk", Type: tar.TypeLink, Link: "disk.vmdk"})},
		{name: "CharacterDevice", rule: "ova-member",
			build: declared(d, ovatest.Member{Name: "zero.vmdk", Type: tar.TypeChar})},
		{name: "Fifo", rule: "ova-member",
			build: declared(d, ovatest.Member{Name: "pipe.vmdk", Type: tar.TypeFifo})},
		{name: "DuplicateMember", rule: "ova-duplicate-member",
			build: declared(d, disk("disk.vmdk", 2048))},
		{name: "MemberInAFolder", rule: "ova-member-name",
			build: declared(d, ovatest.Member{Name: "sub/disk.vmdk", Body: []byte("x")})},
		{name: "EscapingMember", rule: "ova-member-name",
			build: declared(ovatest.Member{Name: "../../etc/cron.d/x", Body: []byte("x")})},
		{name: "DotDotMember", rule: "ova-member-name",
			build: declared(ovatest.Member{Name: "..", Body: []byte("x")})},
		{name: "BackslashMember", rule: "ova-member-name",
			build: declared(ovatest.Member{Name: `..\..\evil.vmdk`, Body: []byte("x")})},
		{name: "ControlCharacterInName", rule: "ova-member-name",
			build: plain(ovatest.Member{Name: "app.ovf", Body: ovatest.OVF()}, ovatest.Member{Name: "disk\x1b[2J.vmdk", Body: []byte("x")})},
		{name: "BidiOverrideInName", rule: "ova-member-name",
			build: declared(ovatest.Member{Name: "disk\u202eexe.vmdk", Body: []byte("x")})},
		{name: "InvalidUTF8Name", rule: "ova-member-name",
			build: plain(ovatest.Member{Name: "app.ovf", Body: ovatest.OVF()}, ovatest.Member{Name: "disk\xff.vmdk", Body: []byte("x")})},
		{name: "UndeclaredMember", rule: "ova-undeclared-member",
			build: plain(append(withOVF([]ovatest.Member{d}, d), ovatest.Member{Name: "payload.bin", Body: []byte("x")})...)},
		{name: "DeclaredFileMissing", rule: "ova-descriptor",
			build: plain(withOVF([]ovatest.Member{d, disk("disk2.vmdk", 10)}, d)...)},
		{name: "MemberLargerThanDeclared", rule: "ova-member-size",
			build: plain(withOVF([]ovatest.Member{disk("disk.vmdk", 100)}, disk("disk.vmdk", 4096))...)},
		{name: "NoDescriptor", rule: "ova-descriptor", build: plain(d)},
		{name: "TwoDescriptors", rule: "ova-descriptor",
			build: plain(append(withOVF([]ovatest.Member{d}, d), ovatest.Member{Name: "b.ovf", Body: ovatest.OVF(d)})...)},
		{name: "DescriptorNotXML", rule: "ova-descriptor",
			build: plain(ovatest.Member{Name: "app.ovf", Body: []byte("<Envelope><References>")}, d)},
		{name: "NoDisk", rule: "ova-no-disk", build: declared(ovatest.Member{Name: "readme.txt", Body: []byte("x")})},
		{name: "NestedOVA", rule: "ova-member", build: declared(ovatest.Member{Name: "inner.ova", Body: []byte("x")})},
		{name: "ManifestLineUnreadable", rule: "ova-manifest",
			build: plain(append(withOVF([]ovatest.Member{d}, d), ovatest.Member{Name: "app.mf", Body: []byte("not a manifest\n")})...)},
		{name: "ManifestDigestTooShort", rule: "ova-manifest",
			build: plain(append(withOVF([]ovatest.Member{d}, d), ovatest.Member{Name: "app.mf", Body: []byte("SHA256(disk.vmdk)= 00\n")})...)},
		{name: "ManifestListsAbsentFile", rule: "ova-manifest",
			build: plain(append(withOVF([]ovatest.Member{d}, d), ovatest.Member{Name: "app.mf", Body: ovatest.Manifest([]ovatest.Member{d, disk("ghost.vmdk", 1)}, nil)})...)},
		{name: "ManifestListsFileTwice", rule: "ova-manifest",
			build: plain(append(withOVF([]ovatest.Member{d}, d), ovatest.Member{Name: "app.mf", Body: ovatest.Manifest([]ovatest.Member{d, d}, nil)})...)},
		{name: "DiskOverVirtualSizeLimit", rule: "ova-size", lim: Limits{MaxVirtualSize: 512},
			build: declared(d)},
		{name: "MoreDisksThanTheCap", rule: "ova-disks", lim: Limits{MaxOVADisks: 2},
			build: declared(disk("a.vmdk", 1), disk("b.vmdk", 1), disk("c.vmdk", 1))},
		{name: "MoreMembersThanTheCap", rule: "ova-members",
			build: plain(withOVF(nil, many(150, 0, ovatest.Member{})...)...)},
		{name: "SymlinkAsMember101UnderARaisedCap", rule: "ova-member", lim: Limits{MaxOVAMembers: 200},
			build: plain(withOVF(nil, many(150, 101, ovatest.Member{Name: "disk101.vmdk", Type: tar.TypeSymlink, Link: "/etc/passwd"})...)...)},
		{name: "TruncatedMember", rule: "truncated-header", build: func(t *testing.T) []byte {
			b := ovatest.Build(t, withOVF([]ovatest.Member{d}, d)...)
			return b[:len(b)-1024-512]
		}},
	}
}

func TestOVAReaderRefusesHostileArchives(t *testing.T) {
	for _, tc := range ovaCases() {
		t.Run(tc.name, func(t *testing.T) {
			b := tc.build(t)
			_, err := ReadOVA(bytes.NewReader(b), int64(len(b)), tc.lim)
			ref := wantRefusal(t, err, tc.rule)
			t.Logf("%s: %s", ref.Rule, ref.Reason)
		})
	}
}

// Inspect is what `imagepipe inspect` runs, ReadOVA what convert runs: an
// archive gets one verdict from both.
func TestInspectJudgesAnOVAAsConvertDoes(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range ovaCases() {
		t.Run(tc.name, func(t *testing.T) {
			path := writeFile(t, filepath.Join(dir, tc.name+".ova"), tc.build(t))
			rep, err := InspectFile(path, tc.lim)
			wantRefusal(t, err, tc.rule)
			if rep.Format != OVA {
				t.Errorf("refused as %q, want ova", rep.Format)
			}
		})
	}
}

func TestOVAReaderRefusesAnyControlOrBidiCharacterInANameWherever(t *testing.T) {
	for _, r := range []rune{0x00, 0x07, 0x1b, 0x7f, 0x85, 0x061c, 0x200e, 0x200f, 0x202a, 0x202e, 0x2066, 0x2069} {
		name := "disk" + string(r) + ".vmdk"
		if r == 0 {
			continue // a NUL ends a ustar name; PAX forbids it
		}
		b := ovatest.Build(t, ovatest.Member{Name: "app.ovf", Body: ovatest.OVF()}, ovatest.Member{Name: name, Body: []byte("x")})
		_, err := ReadOVA(bytes.NewReader(b), int64(len(b)), Limits{})
		ref := wantRefusal(t, err, "ova-member-name")
		if strings.ContainsRune(ref.Reason, r) {
			t.Errorf("%U: the reason carries the character itself: %q", r, ref.Reason)
		}
	}
}

func TestOVAManifestIsCheckedWhereverItIsStored(t *testing.T) {
	d1, d2 := disk("disk1.vmdk", 4096), disk("disk2.vmdk", 4096)
	files := []ovatest.Member{d1, d2}
	bad := map[string]string{"disk2.vmdk": strings.Repeat("ab", 32)}
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"ManifestLast", ovatest.Appliance(t, files, bad)},
		{"ManifestFirst", ovatest.Build(t, append(withOVF(files, ovatest.Member{Name: "app.mf", Body: ovatest.Manifest(files, bad)}), files...)...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, err := ReadOVA(bytes.NewReader(tc.b), int64(len(tc.b)), Limits{})
			if err != nil {
				t.Fatalf("the first pass reads headers only, and must accept: %v", err)
			}
			ref := wantRefusal(t, a.CheckManifest(context.Background(), bytes.NewReader(tc.b)), "ova-manifest")
			if !strings.Contains(ref.Reason, "disk2.vmdk") {
				t.Errorf("reason %q does not name the disk", ref.Reason)
			}
		})
	}
}

func TestOVAManifestCheckStopsWhenCancelled(t *testing.T) {
	files := []ovatest.Member{disk("disk.vmdk", 4<<20)}
	b := ovatest.Appliance(t, files, nil)
	a, err := ReadOVA(bytes.NewReader(b), int64(len(b)), Limits{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := a.CheckManifest(ctx, bytes.NewReader(b)); !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
}

// The real appliances exported by VMware tools declare a disk size that is
// an estimate, larger than the member: that stays accepted.
func TestOVAReaderAcceptsAMemberSmallerThanDeclared(t *testing.T) {
	big := disk("disk.vmdk", 8192)
	small := disk("disk.vmdk", 1024)
	b := ovatest.Build(t, withOVF([]ovatest.Member{big}, small)...)
	if _, err := ReadOVA(bytes.NewReader(b), int64(len(b)), Limits{}); err != nil {
		t.Fatal(err)
	}
}

func TestOVAManifestMismatchNamesBothSums(t *testing.T) {
	d1, d2 := disk("disk1.vmdk", 100), disk("disk2.vmdk", 200)
	files := []ovatest.Member{d1, d2}
	sha1sum := "SHA1(disk2.vmdk) = " + fmt.Sprintf("%x", sha1Of(d2.Body)) + "\n"
	mf := "SHA256(disk1.vmdk)= " + strings.Repeat("a", 64) + "\n" + sha1sum
	b := ovatest.Build(t, append(withOVF(files, files...), ovatest.Member{Name: "app.mf", Body: []byte(mf)})...)
	a, err := ReadOVA(bytes.NewReader(b), int64(len(b)), Limits{})
	if err != nil {
		t.Fatal(err)
	}
	ref := wantRefusal(t, a.CheckManifest(context.Background(), bytes.NewReader(b)), "ova-manifest")
	want := fmt.Sprintf("%x", sha256.Sum256(d1.Body))
	if !strings.Contains(ref.Reason, strings.Repeat("a", 64)) || !strings.Contains(ref.Reason, want) {
		t.Errorf("reason %q does not name both sums", ref.Reason)
	}
	mf = fmt.Sprintf("SHA256(disk1.vmdk)= %x\n", sha256.Sum256(d1.Body)) + sha1sum
	b = ovatest.Build(t, append(withOVF(files, files...), ovatest.Member{Name: "app.mf", Body: []byte(mf)})...)
	if a, err = ReadOVA(bytes.NewReader(b), int64(len(b)), Limits{}); err == nil {
		err = a.CheckManifest(context.Background(), bytes.NewReader(b))
	}
	if err != nil {
		t.Errorf("matching SHA256 and SHA1 refused: %v", err)
	}
}

func sha1Of(b []byte) [20]byte { return sha1.Sum(b) }
