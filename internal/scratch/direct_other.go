//go:build !linux || portable

package scratch

import (
	"errors"
	"io"
	"os"
	"unsafe"
)

// setDirect fails: only Linux's O_DIRECT is used, so elsewhere (and in a
// build tagged portable) every file is read and written through the page
// cache, as on a Linux file system that refuses O_DIRECT.
func setDirect(*os.File, bool) error { return errors.ErrUnsupported }

// alignedBuffer returns n bytes of heap memory starting on a page
// boundary, as an anonymous mapping would: nothing here writes with
// O_DIRECT, but callers may hand the buffer on to code that relies on it.
// The Go heap promises no alignment, so it takes a page more and starts at
// the first boundary.
func alignedBuffer(n int) ([]byte, error) {
	page := os.Getpagesize()
	b := make([]byte, n+page)
	skip := -int(uintptr(unsafe.Pointer(unsafe.SliceData(b)))) & (page - 1)
	return b[skip : skip+n : skip+n], nil
}

// freeBuffer leaves a buffer from alignedBuffer to the garbage collector.
func freeBuffer([]byte) error { return nil }

// pread reads like pread(2): the end of the file is a short count, not an
// error. Only a direct File calls it, which setDirect never allows here.
func pread(f *os.File, b []byte, off int64) (int, error) {
	n, err := f.ReadAt(b, off)
	if err == io.EOF {
		err = nil
	}
	return n, err
}
