// Sparse files: File reads a file with holes without reading the holes.
//
// A raw disk image written by `qemu-img convert -S 4k` is mostly holes. The
// kernel serves a hole as zeros, but only after allocating and clearing a
// page-cache page for every 4 KiB of it: reading an 8 GiB output with 1 GiB
// of data costs seconds of CPU and fills 8 GiB of cache. File maps the data
// extents once with SEEK_DATA/SEEK_HOLE and serves the holes from memory;
// the data it reads with O_DIRECT where it can (see direct.go).

package scratch

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"syscall"
)

// maxExtents bounds the map (16 bytes each): past it, the rest of the file
// is treated as data, which is still correct, only slower.
const maxExtents = 1 << 20

// zeros is what a hole is written as; it is never modified.
var zeros = make([]byte, 1<<20)

// File is a read-only file whose holes read as zeros from memory. It must
// not change while it is read. ReadAt, and Sections each used by one
// goroutine, are safe for concurrent use.
type File struct {
	f    *directReader
	size int64
	// data holds sorted, disjoint [start, end) extents that may hold data.
	data []extent
}

type extent struct{ start, end int64 }

// Open opens path and maps its data extents.
func Open(path string) (*File, error) {
	f, err := openDirectReader(path)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	data, err := mapData(f, st.Size(), maxExtents)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("map the holes of %s: %w", path, err)
	}
	return &File{f: f, size: st.Size(), data: data}, nil
}

// mapData walks the file's data extents. A file system without hole
// support reports the whole file as data.
func mapData(f io.Seeker, size int64, limit int) ([]extent, error) {
	var data []extent
	for off := int64(0); off < size; {
		start, err := f.Seek(off, seekData)
		if errors.Is(err, syscall.ENXIO) {
			break // only a hole remains
		}
		if err != nil {
			return nil, err
		}
		if len(data) == limit-1 {
			data = append(data, extent{start, size})
			break
		}
		end, err := f.Seek(start, seekHole)
		if err != nil {
			return nil, err
		}
		if end <= start || end > size {
			end = size // a file growing under us; read the rest as data
		}
		data = append(data, extent{start, end})
		off = end
	}
	return data, nil
}

// Size is the file's length, holes included.
func (s *File) Size() int64 { return s.size }

// DataBytes is how many bytes the file stores outside its holes.
func (s *File) DataBytes() int64 {
	var n int64
	for _, e := range s.data {
		n += e.end - e.start
	}
	return n
}

// Close closes the file.
func (s *File) Close() error { return s.f.Close() }

// ReadAt reads like os.File.ReadAt; holes come from memory.
func (s *File) ReadAt(p []byte, off int64) (int, error) {
	want, err := readable(len(p), off, s.size)
	if err != nil {
		return 0, err
	}
	n, err := readMapped(p[:want], off, s.f, func(off int64) (bool, int64) { return regionOf(s.data, s.size, off) })
	if err == nil && n < len(p) {
		err = io.EOF
	}
	return n, err
}

// readable is how much of a read of n bytes at off lies within size: an
// error for a negative offset, io.EOF for one at or past the end.
func readable(n int, off, size int64) (int64, error) {
	if off < 0 {
		return 0, errors.New("scratch: negative offset")
	}
	if off >= size {
		return 0, io.EOF
	}
	return min(int64(n), size-off), nil
}

// readMapped fills p from off: data extents from data, holes with zeros.
// region maps an offset as regionOf does, and must map all of p.
func readMapped(p []byte, off int64, data io.ReaderAt, region func(off int64) (inData bool, until int64)) (int, error) {
	n := 0
	for n < len(p) {
		inData, until := region(off)
		chunk := min(int64(len(p)-n), until-off)
		if inData {
			m, err := data.ReadAt(p[n:n+int(chunk)], off)
			n += m
			if err != nil {
				return n, err
			}
		} else {
			clear(p[n : n+int(chunk)])
			n += int(chunk)
		}
		off += chunk
	}
	return n, nil
}

// Section returns a reader of the n bytes from off, with a position of
// its own.
func (s *File) Section(off, n int64) *Section {
	return &Section{src: s, pos: off, end: min(off+n, s.size)}
}

// source is what a Section reads: a File, or a Stream behind its writer.
type source interface {
	io.ReaderAt
	// region says whether off is in a data extent and where that extent
	// or the hole around off ends.
	region(off int64) (inData bool, until int64, err error)
}

// Section reads part of a File or a Stream sequentially.
type Section struct {
	src      source
	pos, end int64
}

// Read reads from the current position.
func (r *Section) Read(p []byte) (int, error) {
	if r.pos >= r.end {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), r.end-r.pos)]
	n, err := r.src.ReadAt(p, r.pos)
	r.pos += int64(n)
	if err == io.EOF && n > 0 {
		err = nil
	}
	return n, err
}

// WriteTo writes the rest of the section to w, holes from a shared buffer
// of zeros, so hashing a mostly-empty image costs little more than hashing
// its data. io.Copy uses it.
func (r *Section) WriteTo(w io.Writer) (int64, error) {
	start := r.pos
	for r.pos < r.end {
		inData, until, err := r.src.region(r.pos)
		if err != nil {
			return r.pos - start, err
		}
		until = min(until, r.end)
		if inData {
			m, err := io.Copy(w, io.NewSectionReader(r.src, r.pos, until-r.pos))
			r.pos += m
			if err != nil {
				return r.pos - start, err
			}
			if r.pos < until {
				return r.pos - start, io.ErrUnexpectedEOF
			}
			continue
		}
		for r.pos < until {
			m, err := w.Write(zeros[:min(int64(len(zeros)), until-r.pos)])
			r.pos += int64(m)
			if err != nil {
				return r.pos - start, err
			}
		}
	}
	return r.pos - start, nil
}

func (s *File) region(off int64) (bool, int64, error) {
	inData, until := regionOf(s.data, s.size, off)
	return inData, until, nil
}

// regionOf says whether off is in one of the sorted, disjoint data
// extents and where that extent or the hole around off ends.
func regionOf(data []extent, size, off int64) (inData bool, until int64) {
	i := sort.Search(len(data), func(i int) bool { return data[i].end > off })
	if i == len(data) {
		return false, size
	}
	if e := data[i]; e.start <= off {
		return true, e.end
	}
	return false, data[i].start
}
