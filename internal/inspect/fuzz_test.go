package inspect

import (
	"bytes"
	"errors"
	"os/exec"
	"testing"
)

// fuzzSeeds returns one small image of every format Inspect knows, so that
// mutations start from headers that get past the magic numbers. The qemu-img
// ones are made in the fuzzer's temporary directory when the tools exist.
func fuzzSeeds(tb testing.TB) [][]byte {
	seeds := [][]byte{
		nil,
		buildVHDX(1<<30, 0),
		buildVHDX(1<<30, vhdxFlagHasParent),
		[]byte(sparseDescriptor("monolithicFlat", `RW 2048 FLAT "/etc/passwd" 0`)),
		append(le64(0xcafebabe), le64(0x200000001)...),
		append([]byte("QED\x00"), make([]byte, 508)...),
	}
	mbr := make([]byte, 1024)
	mbr[446+4] = 0xee
	copy(mbr[446+8:], le32(1))
	copy(mbr[446+12:], le32(1))
	mbr[510], mbr[511] = 0x55, 0xaa
	copy(mbr[512:], "EFI PART")
	seeds = append(seeds, mbr)
	seeds = append(seeds, makeTar(tb, tarMember{name: "a.ovf", body: []byte(ovfText)}, tarMember{name: "a.vmdk", body: make([]byte, 600)}))

	if _, err := exec.LookPath("qemu-img"); err != nil {
		return seeds
	}
	dir := tb.TempDir()
	for _, c := range []struct {
		file, format string
		opts         []string
	}{
		{"v2.qcow2", "qcow2", []string{"-o", "compat=0.10"}},
		{"v3.qcow2", "qcow2", []string{"-o", "cluster_size=4k"}},
		{"data.qcow2", "qcow2", []string{"-o", "data_file=data.raw,cluster_size=4k"}},
		{"v1.qcow", "qcow", nil},
		{"sparse.vmdk", "vmdk", nil},
		{"stream.vmdk", "vmdk", []string{"-o", "subformat=streamOptimized"}},
		{"dynamic.vhd", "vpc", nil},
		{"fixed.vhd", "vpc", []string{"-o", "subformat=fixed"}},
		{"a.vdi", "vdi", nil},
	} {
		seeds = append(seeds, readFile(tb, makeImage(tb, dir, c.file, c.format, "64k", c.opts...)))
	}
	makeImage(tb, dir, "base.qcow2", "qcow2", "64k", "-o", "cluster_size=4k")
	seeds = append(seeds, readFile(tb, makeImage(tb, dir, "top.qcow2", "qcow2", "64k", "-o", "cluster_size=4k", "-b", "base.qcow2", "-F", "qcow2")))
	return seeds
}

func FuzzInspect(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s)
	}
	const limit = 1 << 40
	f.Fuzz(func(t *testing.T, data []byte) {
		r := &countingReaderAt{data: data, size: int64(len(data))}
		rep, err := Inspect(r, r.size, Limits{MaxVirtualSize: limit})
		if r.read > readBudget {
			t.Fatalf("read %d bytes", r.read)
		}
		if err != nil {
			var ref *Refusal
			if !errors.As(err, &ref) {
				t.Fatalf("in-memory input gave a non-refusal error: %v", err)
			}
			if ref.Rule == "" || ref.Reason == "" || ref.Suggestion == "" {
				t.Fatalf("incomplete refusal %+v", ref)
			}
			return
		}
		switch rep.Format {
		case Raw, Qcow2, VHDX, VPC, VMDK, VDI, OVA:
		default:
			t.Fatalf("accepted with unknown format %q", rep.Format)
		}
		if rep.VirtualSize < 0 || rep.VirtualSize > limit {
			t.Fatalf("accepted with virtual size %d", rep.VirtualSize)
		}
		if n, ok := StoredData(rep, bytes.NewReader(data)); ok && (n < 0 || n > rep.VirtualSize) {
			t.Fatalf("stored data %d of a disk of %d bytes", n, rep.VirtualSize)
		}
	})
}

// TestFuzzSeedsAreRecognised keeps the seeds honest: each must be
// recognised (accepted as a format other than raw, or refused; the
// partitioned raw disk aside), or the fuzzer starts from noise that never
// gets past the magic numbers.
func TestFuzzSeedsAreRecognised(t *testing.T) {
	for i, s := range fuzzSeeds(t)[1:] {
		rep, err := Inspect(bytes.NewReader(s), int64(len(s)), Limits{})
		if err == nil && rep.Format == Raw && partitionTable(s) == "" {
			t.Errorf("seed %d (% x...) reads as raw", i+1, s[:min(len(s), 8)])
		}
	}
}
