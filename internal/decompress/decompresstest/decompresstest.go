// Package decompresstest builds compressed streams for tests, among them
// the hostile ones no encoder writes: bombs and oversized windows.
package decompresstest

import (
	"bytes"
	"compress/gzip"
	"io"
	"testing"

	"github.com/ulikunitz/xz"
)

// Compressed runs data through the writer newWriter makes.
func Compressed(tb testing.TB, data []byte, newWriter func(io.Writer) (io.WriteCloser, error)) []byte {
	tb.Helper()
	var buf bytes.Buffer
	w, err := newWriter(&buf)
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := w.Write(data); err != nil {
		tb.Fatal(err)
	}
	if err := w.Close(); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// Gzip is a gzip writer, for Compressed.
func Gzip(w io.Writer) (io.WriteCloser, error) { return gzip.NewWriter(w), nil }

// XZWithDict makes xz writers with a dictionary of dictCap bytes, for
// Compressed: the dictionary is what a decoder must hold in memory.
func XZWithDict(dictCap int) func(io.Writer) (io.WriteCloser, error) {
	return func(w io.Writer) (io.WriteCloser, error) { return xz.WriterConfig{DictCap: dictCap}.NewWriter(w) }
}

// ZstdRun is a zstd frame of n copies of b made of RLE blocks, four bytes
// per 128 KiB: the cheapest bomb there is, written by hand because an
// encoder would have to read all n bytes (RFC 8878, section 3.1.1).
func ZstdRun(b byte, n int64) []byte {
	const block = 128 << 10
	frame := []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, 7 << 3} // no checksum, window 128 KiB
	for n > 0 {
		size := min(n, block)
		n -= size
		hdr := int(size)<<3 | 1<<1 // RLE
		if n == 0 {
			hdr |= 1 // last block
		}
		frame = append(frame, byte(hdr), byte(hdr>>8), byte(hdr>>16), b)
	}
	return frame
}
