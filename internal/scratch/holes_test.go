package scratch

import (
	"os"
	"path/filepath"
	"testing"
)

// fileWithData writes a file of size bytes that is holes but for data at
// each offset given, and returns its path.
func fileWithData(t *testing.T, size int64, data map[int64][]byte) string {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "out.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	for off, b := range data {
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return f.Name()
}

func TestHolesCountsARangeAsZerosOnlyWhenItIs(t *testing.T) {
	const mib = 1 << 20
	path := fileWithData(t, 8*mib, map[int64][]byte{
		0:       make([]byte, 4096),               // data that is zeros, as qemu-img writes first
		2 * mib: {0, 0, 1},                        // one byte that is not
		4 * mib: make([]byte, zeroCheckMax+4096),  // more zeros as data than are read to check
		7 * mib: append(make([]byte, 4095), 0x00), // zeros again, after the rest
	})
	h, err := OpenHoles(path)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	for _, tc := range []struct {
		off, n int64
		want   bool
	}{
		{0, 2 * mib, true},
		{mib, 2 * mib, false},
		{3 * mib, mib, true},
		{4 * mib, mib, false},
		{5 * mib, 3 * mib, true},
	} {
		got, err := h.Hole(tc.off, tc.n)
		if err != nil {
			t.Fatal(err)
		}
		if mapsHoles && got != tc.want {
			t.Errorf("Hole(%d MiB, %d MiB) = %v, want %v", tc.off/mib, tc.n/mib, got, tc.want)
		}
		if !mapsHoles && got {
			t.Errorf("Hole(%d MiB, %d MiB) = true in a build that finds no holes", tc.off/mib, tc.n/mib)
		}
	}
}
