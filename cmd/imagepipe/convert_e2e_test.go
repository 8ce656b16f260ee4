package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/minio/minio-go/v7"
	"github.com/ulikunitz/xz"

	"github.com/imagepipe/imagepipe/events"
)

func converted(t *testing.T, ev events.Event) events.Converted {
	t.Helper()
	if ev.Type != events.TypeConverted {
		t.Fatalf("event type %s, want converted: %s", ev.Type, ev.Data)
	}
	var c events.Converted
	if err := ev.DecodeData(events.TypeConverted, &c); err != nil {
		t.Fatal(err)
	}
	return c
}

func putObject(t *testing.T, key string, body []byte, meta map[string]string) {
	t.Helper()
	_, err := e2e.s3.PutObject(context.Background(), "uploads", key, bytes.NewReader(body), int64(len(body)),
		minio.PutObjectOptions{UserMetadata: meta, DisableMultipart: true})
	if err != nil {
		t.Fatalf("upload %s: %v", key, err)
	}
}

func outputsUnder(t *testing.T, prefix string) []string {
	t.Helper()
	var keys []string
	for obj := range e2e.s3.ListObjects(context.Background(), "images", minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
		if obj.Err != nil {
			t.Fatal(obj.Err)
		}
		keys = append(keys, obj.Key)
	}
	return keys
}

func compress(t *testing.T, codec string, data []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	var w io.WriteCloser
	var err error
	switch codec {
	case "gz":
		w = gzip.NewWriter(&buf)
	case "xz":
		w, err = xz.NewWriter(&buf)
	case "zst":
		w, err = zstd.NewWriter(&buf)
	}
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestCompressedUploadsAreDecompressedAndConverted(t *testing.T) {
	dir := t.TempDir()
	path := makeImage(t, dir, "cloud.qcow2", "qcow2", "write -P 0x61 0 1M", "write -P 0x62 30M 1M")
	want, _ := localRaw(t, path, "qcow2")
	plain, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	res := subscribeResults(t)
	for _, codec := range []string{"gz", "xz", "zst"} {
		key := "e2e/compressed/cloud.qcow2." + codec
		putObject(t, key, compress(t, codec, plain), nil)
		c := converted(t, res.await(t, key, 60*time.Second))
		if c.InputFormat != "qcow2" || c.SHA256 != want || c.OutputKey != key+".raw" {
			t.Errorf("%s: converted %+v, want qcow2 with sha256 %s", codec, c, want)
		}
	}
}

func TestUploadMetadataAsksForQcow2Output(t *testing.T) {
	dir := t.TempDir()
	path := makeImage(t, dir, "meta.vhdx", "vhdx", "write -P 0x71 0 2M")
	want, _ := localRaw(t, path, "vhdx")
	body, _ := os.ReadFile(path)
	res := subscribeResults(t)
	key := "e2e/qcow2out/meta.vhdx"
	putObject(t, key, body, map[string]string{"imagepipe-format": "qcow2"})
	c := converted(t, res.await(t, key, 60*time.Second))
	if c.OutputFormat != "qcow2" || c.OutputKey != key+".qcow2" {
		t.Fatalf("output %s (%s), want %s.qcow2", c.OutputKey, c.OutputFormat, key)
	}
	// The stored qcow2 holds the same disk: converted back to raw here, it
	// must equal the local raw conversion of the upload.
	local := filepath.Join(t.TempDir(), "out.qcow2")
	if err := e2e.s3.FGetObject(context.Background(), "images", c.OutputKey, local, minio.GetObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := fileSum(t, local); got != c.SHA256 {
		t.Errorf("stored qcow2 sha256 %s, event says %s", got, c.SHA256)
	}
	if got, _ := localRaw(t, local, "qcow2"); got != want {
		t.Errorf("qcow2 output holds a different disk: raw sha256 %s, want %s", got, want)
	}
}

func TestDeclaredChecksumIsVerified(t *testing.T) {
	dir := t.TempDir()
	path := makeImage(t, dir, "sum.qcow2", "qcow2", "write -P 0x7a 0 1M")
	body, _ := os.ReadFile(path)
	good := sha256.Sum256(body)
	res := subscribeResults(t)

	putObject(t, "e2e/checksum/good.qcow2", body, map[string]string{"imagepipe-sha256": hex.EncodeToString(good[:])})
	converted(t, res.await(t, "e2e/checksum/good.qcow2", 60*time.Second))

	putObject(t, "e2e/checksum/bad.qcow2", body, map[string]string{"imagepipe-sha256": strings.Repeat("ab", 32)})
	f := awaitFailure(t, res, "e2e/checksum/bad.qcow2")
	if f.Rule != "checksum" || !strings.Contains(f.Message, strings.Repeat("ab", 32)) || !strings.Contains(f.Message, hex.EncodeToString(good[:])) {
		t.Errorf("failure %+v, want rule checksum naming both sums", f)
	}
	if keys := outputsUnder(t, "e2e/checksum/bad"); len(keys) != 0 {
		t.Errorf("outputs for a corrupt upload: %v", keys)
	}
}

// buildOVA writes an OVA holding an OVF descriptor, a manifest and disks.
func buildOVA(t *testing.T, disks map[string][]byte, order []string, manifest map[string]string) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	add := func(name string, data []byte) {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(data)), Typeflag: tar.TypeReg}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(data); err != nil {
			t.Fatal(err)
		}
	}
	var refs strings.Builder
	for _, name := range order {
		fmt.Fprintf(&refs, `<File ovf:href="%s" ovf:size="%d"/>`, name, len(disks[name]))
	}
	add("appliance.ovf", []byte(`<?xml version="1.0"?><Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References>`+refs.String()+`</References></Envelope>`))
	var mf strings.Builder
	for _, name := range order {
		sum := manifest[name]
		if sum == "" {
			s := sha256.Sum256(disks[name])
			sum = hex.EncodeToString(s[:])
		}
		fmt.Fprintf(&mf, "SHA256(%s)= %s\n", name, sum)
	}
	add("appliance.mf", []byte(mf.String()))
	for _, name := range order {
		add(name, disks[name])
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestOVADisksAreConvertedOneByOneUnderItsKey(t *testing.T) {
	dir := t.TempDir()
	d1 := makeImage(t, dir, "web-disk1.vmdk", "vmdk", "write -P 0x31 0 1M")
	runTool(t, "qemu-img", "convert", "-f", "vmdk", "-O", "vmdk", "-o", "subformat=streamOptimized", d1, filepath.Join(dir, "so.vmdk"))
	d2 := makeImage(t, dir, "web-disk2.vmdk", "vmdk", "write -P 0x32 5M 1M")
	want1, _ := localRaw(t, d1, "vmdk")
	want2, _ := localRaw(t, d2, "vmdk")
	b1, _ := os.ReadFile(filepath.Join(dir, "so.vmdk"))
	b2, _ := os.ReadFile(d2)
	disks := map[string][]byte{"web-disk1.vmdk": b1, "web-disk2.vmdk": b2}
	order := []string{"web-disk1.vmdk", "web-disk2.vmdk"}

	res := subscribeResults(t)
	key := "e2e/ova/web.ova"
	putObject(t, key, buildOVA(t, disks, order, nil), nil)
	got := map[string]string{}
	for range 2 {
		c := converted(t, res.await(t, key, 60*time.Second))
		got[c.OutputKey] = c.SHA256
		if sum, _ := downloadSum(t, "images", c.OutputKey); sum != c.SHA256 {
			t.Errorf("%s stored sha256 %s, event says %s", c.OutputKey, sum, c.SHA256)
		}
	}
	want := map[string]string{events.OVADiskKey("", key, "web-disk1.vmdk", "raw"): want1, events.OVADiskKey("", key, "web-disk2.vmdk", "raw"): want2}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("outputs %v, want %v", got, want)
	}

	bad := "e2e/ova/tampered.ova"
	putObject(t, bad, buildOVA(t, disks, order, map[string]string{"web-disk1.vmdk": strings.Repeat("0", 64)}), nil)
	f := awaitFailure(t, res, bad)
	if f.Rule != "ova-manifest" {
		t.Errorf("failure %+v, want rule ova-manifest", f)
	}
	if keys := outputsUnder(t, bad); len(keys) != 0 {
		t.Errorf("outputs for a tampered OVA: %v", keys)
	}
}

// Hostile images are built in the test's own temp dir by qemu-img or by
// patching bytes; the "host file" they reach for is a file of the test's
// with a pattern that must never show up in any output.
func TestHostileImagesAreRefusedAndLeakNothing(t *testing.T) {
	dir := t.TempDir()
	secretPattern := []byte("HOST-SECRET-DO-NOT-LEAK.")
	secret := filepath.Join(dir, "host-secret.raw")
	if err := os.WriteFile(secret, bytes.Repeat(secretPattern, (1<<20)/len(secretPattern)+1)[:1<<20], 0o600); err != nil {
		t.Fatal(err)
	}
	qcow := func(name string, args ...string) []byte {
		p := filepath.Join(dir, name)
		runTool(t, "qemu-img", append(append([]string{"create", "-q", "-f", "qcow2"}, args...), p, "1M")...)
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	placeholder := strings.Repeat("A", 64)
	jsonBacking := qcow("json.qcow2", "-u", "-b", placeholder, "-F", "raw")
	jsonName := fmt.Sprintf(`json:{"file.filename":%q}`, secret)
	jsonName += strings.Repeat(" ", 64-len(jsonName)%64)[:max(0, 64-len(jsonName))]
	if len(jsonName) != 64 {
		jsonName = jsonName[:64]
	}
	jsonBacking = bytes.Replace(jsonBacking, []byte(placeholder), []byte(jsonName), 1)

	huge := qcow("huge.qcow2")
	copy(huge[24:32], []byte{0x10, 0, 0, 0, 0, 0, 0, 0}) // 2^60 bytes

	polyglot := qcow("polyglot.qcow2")
	polyglot[510], polyglot[511] = 0x55, 0xAA
	copy(polyglot[512:], "EFI PART")

	descriptor := fmt.Sprintf("# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT %q 0\n", secret)

	cases := []struct {
		name, key string
		body      []byte
		rule      string
	}{
		{"qcow2 backing a host file", "backing.qcow2", qcow("backing.qcow2", "-b", secret, "-F", "raw"), "backing-file"},
		{"qcow2 with json: backing", "json.qcow2", jsonBacking, "backing-file"},
		{"qcow2 with external data file", "datafile.qcow2", qcow("datafile.qcow2", "-o", "data_file="+filepath.Join(dir, "data.raw")), "data-file"},
		{"vmdk descriptor with host extent", "descriptor.vmdk", []byte(descriptor), "vmdk-descriptor"},
		{"huge virtual size", "huge.qcow2", huge, "virtual-size"},
		{"polyglot", "polyglot.qcow2", polyglot, "polyglot"},
		{"qcow2 named vhdx", "disguised.vhdx", qcow("disguised.qcow2"), "extension-mismatch"},
		{"truncated header", "truncated.qcow2", qcow("trunc.qcow2")[:48], "truncated-header"},
	}
	res := subscribeResults(t)
	for _, tc := range cases {
		putObject(t, "e2e/hostile/"+tc.key, tc.body, nil)
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := awaitFailure(t, res, "e2e/hostile/"+tc.key)
			if f.Rule != tc.rule || f.Phase != events.PhaseInspect || !strings.Contains(f.Message, tc.rule) || f.Suggestion == "" {
				t.Errorf("failure = %+v, want rule %s in phase inspect with a suggestion", f, tc.rule)
			}
		})
	}
	if keys := outputsUnder(t, "e2e/hostile/"); len(keys) != 0 {
		t.Errorf("hostile uploads produced outputs: %v", keys)
	}
	// Nothing anywhere in the output bucket carries the host file's bytes.
	for _, key := range outputsUnder(t, "") {
		if outputHolds(t, key, secretPattern) {
			t.Errorf("output %s contains bytes of the host file", key)
		}
	}
}

// outputHolds reports whether the output at key holds pattern. The output
// is read as a stream, since some are GiB large, and other tests running
// beside this one may replace or remove it meanwhile: a read cut short by
// that is made again, and an output gone holds nothing.
func outputHolds(t *testing.T, key string, pattern []byte) bool {
	t.Helper()
	var err error
	for range 3 {
		var obj *minio.Object
		if obj, err = e2e.s3.GetObject(context.Background(), "images", key, minio.GetObjectOptions{}); err == nil {
			var found bool
			found, err = streamHolds(obj, pattern)
			obj.Close()
			if err == nil {
				return found
			}
		}
		if minio.ToErrorResponse(err).Code == "NoSuchKey" {
			return false
		}
	}
	t.Fatalf("read output %s: %v", key, err)
	return false
}

// streamHolds looks for pattern in r, a window at a time, keeping each
// window's tail so that a pattern across two windows is found too. Only
// io.EOF ends the stream; a read cut short is the reader's error.
func streamHolds(r io.Reader, pattern []byte) (bool, error) {
	const window = 4 << 20
	buf := make([]byte, 0, window+len(pattern))
	for {
		n, err := r.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		// Only what this read added, with the pattern's length before it.
		if bytes.Contains(buf[max(0, len(buf)-n-len(pattern)+1):], pattern) {
			return true, nil
		}
		if err == io.EOF {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		if len(buf) == cap(buf) {
			keep := len(pattern) - 1
			buf = append(buf[:0], buf[len(buf)-keep:]...)
		}
	}
}

// The output scan must find the host file's bytes wherever they sit:
// across a window's edge, or at the very end, read in any chunk size.
func TestStreamHoldsFindsAPatternAcrossWindowsAndChunks(t *testing.T) {
	pattern := []byte("HOST-FILE-SECRET")
	for _, at := range []int{0, 4<<20 - 5, 4 << 20, 9<<20 - len(pattern)} {
		data := make([]byte, 9<<20)
		copy(data[at:], pattern)
		for name, r := range map[string]io.Reader{"whole": bytes.NewReader(data), "halves": iotest.HalfReader(bytes.NewReader(data))} {
			if found, err := streamHolds(r, pattern); err != nil || !found {
				t.Errorf("pattern at %d read by %s: found %v, err %v", at, name, found, err)
			}
		}
	}
	if found, err := streamHolds(bytes.NewReader(make([]byte, 9<<20)), pattern); err != nil || found {
		t.Errorf("zeros: found %v, err %v", found, err)
	}
	if _, err := streamHolds(iotest.TimeoutReader(bytes.NewReader(make([]byte, 9<<20))), pattern); err == nil {
		t.Error("a stream cut short was read as complete")
	}
}
