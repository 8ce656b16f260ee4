package inspect

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"testing"
)

// The table's entries are read where the region table says; a table too
// short for the disk, or one a log not replayed may have changed, is not
// trusted.
func TestVHDXStoredDataReadsTheTableTheRegionTableNames(t *testing.T) {
	for _, tc := range []struct {
		name  string
		vsize uint64
		dirty bool
		want  int64
		ok    bool
	}{
		{"1 GiB", 1 << 30, false, 2 << 20, true},
		{"the first six blocks", 6<<20 - 4096, false, 2<<20 - 4096, true},
		{"a table too short for 2 GiB", 2 << 30, false, 0, false},
		{"a log not replayed", 1 << 30, true, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := buildVHDX(tc.vsize, 0)
			if tc.dirty {
				for _, off := range []int{vhdxHeader1, vhdxHeader2} {
					h := b[off : off+vhdxHeaderSize]
					h[48] = 1 // the log GUID
					binary.LittleEndian.PutUint32(h[4:], 0)
					binary.LittleEndian.PutUint32(h[4:], crc32.Checksum(h, castagnoli))
				}
			}
			rep, err := Inspect(bytes.NewReader(b), int64(len(b)), Limits{})
			if err != nil {
				t.Fatal(err)
			}
			if n, ok := StoredData(rep, bytes.NewReader(b)); n != tc.want || ok != tc.ok {
				t.Errorf("StoredData = %d, %v; want %d, %v", n, ok, tc.want, tc.ok)
			}
		})
	}
}

func TestStoredDataIsUnknownForFormatsQemuImgMaps(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	p := makeImage(t, dir, "d.qcow2", "qcow2", "64M")
	rep, err := InspectFile(p, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := StoredData(rep, nil); ok {
		t.Error("stored data known for a qcow2, which qemu-img measures itself")
	}
}
