package scratch

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
)

// Holes answers, for a sparse file, whether a range is all zeros, asking
// the file system where its data is (SEEK_DATA, SEEK_HOLE) rather than
// reading the holes. The little data a range holds, up to zeroCheckMax,
// is read and checked: qemu-img writes the first 4 KiB block of every raw
// file it creates, zeros or not. A file system that keeps no holes has
// all data, and then no range counts as zeros; nor does any in a build
// without SEEK_DATA (see seek_other.go).
//
// An upload asks it which parts of a raw output it may have the server
// copy from an object of zeros instead of sending them.
type Holes struct{ f *os.File }

// zeroCheckMax is the most data in one range that is read to see whether
// it is zeros; a range with more counts as data.
const zeroCheckMax = 64 << 10

// OpenHoles opens path to ask about its holes. The file may still be
// growing: a range is asked about only once its bytes are final.
func OpenHoles(path string) (*Holes, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open %s to map its holes: %w", path, err)
	}
	return &Holes{f: f}, nil
}

// Hole reports whether [off, off+n) reads as zeros: holes, and at most
// zeroCheckMax bytes of data that are zeros.
func (h *Holes) Hole(off, n int64) (bool, error) {
	if !mapsHoles || n <= 0 {
		return false, nil
	}
	end, budget := off+n, int64(zeroCheckMax)
	for pos := off; pos < end; {
		data, err := h.f.Seek(pos, seekData)
		if errors.Is(err, syscall.ENXIO) {
			return true, nil // no data from pos to the end
		}
		if err != nil {
			return false, fmt.Errorf("find the data of %s: %w", h.f.Name(), err)
		}
		if data >= end {
			return true, nil
		}
		hole, err := h.f.Seek(data, seekHole)
		if err != nil {
			return false, fmt.Errorf("find the holes of %s: %w", h.f.Name(), err)
		}
		hole = min(max(hole, data+1), end)
		if budget -= hole - data; budget < 0 {
			return false, nil
		}
		if zero, err := h.zeros(data, hole-data); err != nil || !zero {
			return false, err
		}
		pos = hole
	}
	return true, nil
}

// zeros reports whether the n bytes at off are all zero.
func (h *Holes) zeros(off, n int64) (bool, error) {
	buf := make([]byte, n)
	if _, err := h.f.ReadAt(buf, off); err != nil && err != io.EOF {
		return false, fmt.Errorf("read %s: %w", h.f.Name(), err)
	}
	for _, b := range buf {
		if b != 0 {
			return false, nil
		}
	}
	return true, nil
}

// Close closes the file.
func (h *Holes) Close() error { return h.f.Close() }
