//go:build unix

package inspect

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// storedData inspects the VHDX at path and counts its stored data.
func storedData(t *testing.T, path string) (Report, int64) {
	t.Helper()
	rep, err := InspectFile(path, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, ok := StoredData(rep, f)
	if !ok {
		t.Fatal("the stored data of a VHDX qemu-img wrote is not known")
	}
	return rep, n
}

// rawDataOf converts path to raw with qemu-img in dir and returns the disk
// the output's data takes, less the first 4 KiB block, which qemu-img
// allocates in every raw file it creates to learn the file system's
// alignment.
func rawDataOf(t *testing.T, dir, path, format string) int64 {
	t.Helper()
	out := filepath.Join(dir, "out.raw")
	runIn(t, dir, "qemu-img", "convert", "-S", "4k", "-f", format, "-O", "raw", path, out)
	fi, err := os.Stat(out)
	if err != nil {
		t.Fatal(err)
	}
	return max(fi.Sys().(*syscall.Stat_t).Blocks*512-4096, 0)
}

// A VHDX's stored data is its blocks marked present, in whole blocks, the
// last one cut at the virtual size.
func TestVHDXStoredDataIsItsPresentBlocks(t *testing.T) {
	requireQemu(t)
	for _, tc := range []struct {
		name, size string
		opts       []string
		writes     []string
		want       int64
	}{
		{"three blocks", "64M", []string{"-o", "block_size=1M"},
			[]string{"write -P 1 0 4k", "write -P 2 5M 1M", "write -P 3 63M 1k"}, 3 << 20},
		{"last block cut short", "20M", []string{"-o", "block_size=8M,log_size=1M"},
			[]string{"write -P 1 0 4k", "write -P 2 19M 4k"}, 8<<20 + 4<<20},
		{"empty", "64M", nil, nil, 0},
		// 256 MiB blocks of 512-byte sectors: a sector bitmap entry after
		// every 16 payload entries, so block 16 is entry 17 and block 20,
		// cut to 128 MiB, entry 21.
		{"past sector bitmap entries", "5248M", []string{"-o", "block_size=256M"},
			[]string{"write -P 1 0 4k", "write -P 2 4G 4k", "write -P 3 5G 4k"}, 256<<20 + 256<<20 + 128<<20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := makeImage(t, dir, "d.vhdx", "vhdx", tc.size, tc.opts...)
			for _, w := range tc.writes {
				runIn(t, dir, "qemu-io", "-f", "vhdx", "-c", w, p)
			}
			_, n := storedData(t, p)
			if n != tc.want {
				t.Errorf("stored data %d, want %d", n, tc.want)
			}
			if got := rawDataOf(t, dir, p, "vhdx"); got > n {
				t.Errorf("qemu-img wrote %d bytes of data, more than the %d counted", got, n)
			}
		})
	}
}

// Entries that all name the same stored block are each counted: a few
// KiB of VHDX that qemu-img reads as 64 MiB of data is counted as 64 MiB,
// and the raw output qemu-img writes from it takes no more than that.
func TestVHDXBlocksSharingBytesAreEachCounted(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	p := makeImage(t, dir, "d.vhdx", "vhdx", "64M", "-o", "block_size=1M")
	runIn(t, dir, "qemu-io", "-f", "vhdx", "-c", "write -P 0x5a 0 1M", p)
	rep, _ := storedData(t, p)
	first := readFile(t, p)[rep.vhdx.bat:][:8]
	for i := range int64(64) {
		patchFile(t, p, int64(rep.vhdx.bat)+8*i, first)
	}
	_, n := storedData(t, p)
	if n != 64<<20 {
		t.Errorf("stored data %d, want all 64 MiB", n)
	}
	if got := rawDataOf(t, dir, p, "vhdx"); got < 63<<20 || got > n {
		t.Fatalf("qemu-img wrote %d bytes of data, want nearly 64 MiB (the fixture aliases every block) and no more than %d", got, n)
	}
}
