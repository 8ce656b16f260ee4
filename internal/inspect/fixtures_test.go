package inspect

import (
	"archive/tar"
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// Fixtures are made by the real qemu-img inside the test's own temporary
// directory, always with relative names and cmd.Dir set to that directory,
// so that no qemu-img invocation can touch a path outside it.

func requireQemu(t testing.TB) {
	t.Helper()
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is not installed: run `go tool task deps` (Debian package qemu-utils)", tool)
		}
	}
}

func runIn(t testing.TB, dir, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// makeImage creates file in dir with qemu-img create and returns its path.
func makeImage(t testing.TB, dir, file, format, size string, opts ...string) string {
	t.Helper()
	args := append([]string{"create", "-q", "-f", format}, opts...)
	runIn(t, dir, "qemu-img", append(args, file, size)...)
	return filepath.Join(dir, file)
}

// writePattern puts guest data into an image so that fixtures are not all
// empty tables.
func writePattern(t testing.TB, dir, file, format string) {
	t.Helper()
	runIn(t, dir, "qemu-io", "-f", format, "-c", "write -P 0xab 0 64k", file)
}

func qemuInfo(t testing.TB, dir, file, format string) []byte {
	t.Helper()
	return runIn(t, dir, "qemu-img", "info", "--output=json", "-f", format, "--force-share", file)
}

func patchFile(t testing.TB, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func readFile(t testing.TB, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func writeFile(t testing.TB, path string, b []byte) string {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }
func le32(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }
func le64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }

// fixVPCFooter recomputes the checksum of the 512-byte footer at off.
func fixVPCFooter(t testing.TB, path string, off int64) {
	t.Helper()
	b := readFile(t, path)[off : off+512]
	patchFile(t, path, off+64, be32(vpcChecksum(b, 64)))
}

// patchVPCFooters applies change to both copies of a dynamic VHD's footer
// and keeps their checksums valid, as a hostile writer would.
func patchVPCFooters(t testing.TB, path string, fieldOff int64, v []byte) {
	t.Helper()
	size := int64(len(readFile(t, path)))
	for _, off := range []int64{0, size - 512} {
		patchFile(t, path, off+fieldOff, v)
		fixVPCFooter(t, path, off)
	}
}

// vhdxMetadataEntry finds the metadata table entry for item in a VHDX
// file and returns the file offsets of the entry and of the item's data.
func vhdxMetadataEntry(t testing.TB, path string, item [16]byte) (entryOff, dataOff int64) {
	t.Helper()
	b := readFile(t, path)
	le := binary.LittleEndian
	table := b[vhdxRegionTable1:]
	var metaOff int64
	for i := range int(le.Uint32(table[8:])) {
		e := table[16+32*i:]
		if [16]byte(e[:16]) == vhdxRegionMetadata {
			metaOff = int64(le.Uint64(e[16:]))
		}
	}
	if metaOff == 0 {
		t.Fatal("no metadata region in fixture")
	}
	meta := b[metaOff:]
	for i := range int(le.Uint16(meta[10:])) {
		e := meta[32+32*i:]
		if [16]byte(e[:16]) == item {
			return metaOff + 32 + 32*int64(i), metaOff + int64(le.Uint32(e[16:]))
		}
	}
	t.Fatal("metadata item not found in fixture")
	return 0, 0
}

// rewriteDescriptor replaces the embedded descriptor of a sparse VMDK,
// zero-padding it to the space the header reserves.
func rewriteDescriptor(t testing.TB, path, text string) {
	t.Helper()
	b := readFile(t, path)
	h := parseVMDKHeader(b)
	room := int(h.descSize * 512)
	if len(text) > room {
		t.Fatalf("descriptor of %d bytes does not fit %d", len(text), room)
	}
	buf := make([]byte, room)
	copy(buf, text)
	patchFile(t, path, int64(h.descOffset*512), buf)
}

func sparseDescriptor(createType, extents string, extra ...string) string {
	return "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n" +
		`createType="` + createType + "\"\n" + strings.Join(extra, "\n") + "\n" +
		"\n# Extent description\n" + extents + "\n\n# The Disk Data Base\n#DDB\n\nddb.adapterType = \"ide\"\n"
}

type tarMember struct {
	name     string
	body     []byte
	typeflag byte
	link     string
}

func makeTar(t testing.TB, members ...tarMember) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, m := range members {
		h := &tar.Header{Name: m.name, Mode: 0o644, Size: int64(len(m.body)), Typeflag: m.typeflag, Linkname: m.link, Format: tar.FormatUSTAR}
		if h.Typeflag == 0 {
			h.Typeflag = tar.TypeReg
		}
		if h.Typeflag != tar.TypeReg {
			h.Size = 0
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Size > 0 {
			if _, err := tw.Write(m.body); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

const ovfText = `<?xml version="1.0"?><Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"/>` + "\n"

// buildVHDX writes a minimal VHDX in memory: valid headers and region
// tables, a metadata region right after them rather than at the
// 1 MiB-aligned place real writers use, and a block table for a disk of
// 1 GiB after that, so that it stays small enough to seed a fuzzer.
func buildVHDX(virtualSize uint64, fileFlags uint32) []byte {
	const metaOff = vhdxMinSize
	const itemOff = 64 << 10
	const batOff, batLen = metaOff + itemOff + 4096, 8 << 10
	le := binary.LittleEndian
	b := make([]byte, batOff+batLen)
	copy(b, "vhdxfile")
	for i, off := range []int{vhdxHeader1, vhdxHeader2} {
		h := b[off : off+vhdxHeaderSize]
		copy(h, "head")
		le.PutUint64(h[8:], uint64(i+1))
		le.PutUint16(h[66:], 1)
		le.PutUint32(h[4:], crc32.Checksum(h, castagnoli))
	}
	for _, off := range []int{vhdxRegionTable1, vhdxRegionTable2} {
		tb := b[off : off+vhdxRegionSize]
		copy(tb, "regi")
		le.PutUint32(tb[8:], 2)
		for i, r := range []struct {
			id       [16]byte
			off, len int
		}{{vhdxRegionMetadata, metaOff, 1 << 20}, {vhdxRegionBAT, batOff, batLen}} {
			e := tb[16+32*i:]
			copy(e, r.id[:])
			le.PutUint64(e[16:], uint64(r.off))
			le.PutUint32(e[24:], uint32(r.len))
			le.PutUint32(e[28:], 1)
		}
		le.PutUint32(tb[4:], crc32.Checksum(tb, castagnoli))
	}
	m := b[metaOff:]
	copy(m, "metadata")
	le.PutUint16(m[10:], 3)
	for i, it := range []struct {
		id  [16]byte
		len uint32
	}{{vhdxItemFileParams, 8}, {vhdxItemVirtualSize, 8}, {vhdxItemLogicalSect, 4}} {
		e := m[32+32*i:]
		copy(e, it.id[:])
		le.PutUint32(e[16:], uint32(itemOff+8*i))
		le.PutUint32(e[20:], it.len)
		le.PutUint32(e[24:], vhdxMetaIsRequired)
	}
	le.PutUint32(m[itemOff:], 1<<20)
	le.PutUint32(m[itemOff+4:], fileFlags)
	le.PutUint64(m[itemOff+8:], virtualSize)
	le.PutUint32(m[itemOff+16:], 512)
	// Two 1 MiB blocks of the table's 1024 are present, both at the
	// file's first MiB.
	for _, i := range []int{0, 5} {
		le.PutUint64(b[batOff+8*i:], 6)
	}
	return b
}

// countingReaderAt records how many bytes an inspection reads. Offsets
// beyond data read as zeros up to size, which lets a test claim a huge
// file without having one.
type countingReaderAt struct {
	data []byte
	size int64
	read int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if off >= c.size {
		return 0, errors.New("read beyond claimed size")
	}
	n := len(p)
	if int64(n) > c.size-off {
		n = int(c.size - off)
	}
	clear(p[:n])
	if off < int64(len(c.data)) {
		copy(p[:n], c.data[off:])
	}
	c.read += int64(n)
	return n, nil
}

func wantRefusal(t *testing.T, err error, rule string) *Refusal {
	t.Helper()
	var ref *Refusal
	if !errors.As(err, &ref) {
		t.Fatalf("want refusal by rule %s, got %v", rule, err)
	}
	if ref.Rule != rule {
		t.Fatalf("want refusal by rule %s, got %v", rule, ref)
	}
	if ref.Reason == "" || ref.Suggestion == "" {
		t.Fatalf("refusal %s lacks a reason or a suggestion: %+v", rule, ref)
	}
	return ref
}
