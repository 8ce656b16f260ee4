package scratch

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"testing"
	"unsafe"
)

func TestWriterAtStoresBytesAtAnyOffsetAndLeavesTheRestZero(t *testing.T) {
	const size = 4*windowSize + 123
	path := filepath.Join(t.TempDir(), "out")
	w, err := CreateWriterAt(path, size)
	if err != nil {
		t.Fatal(err)
	}
	if (w.direct != nil) != usesODirect {
		t.Errorf("WriterAt uses O_DIRECT: %v, in a build where O_DIRECT is used: %v", w.direct != nil, usesODirect)
	}
	want := make([]byte, size)
	src := pattern(size)
	aligned, err := alignedBuffer(2 * align)
	if err != nil {
		t.Fatal(err)
	}
	defer freeBuffer(aligned)
	copy(aligned, src[windowSize:])
	writes := []struct {
		off int64
		p   []byte
	}{
		{windowSize, aligned},      // aligned everywhere: the direct path where there is one
		{17, src[17 : 17+align+5]}, // neither offset nor length aligned
		{2 * windowSize, src[2*windowSize+1 : 2*windowSize+1+align]}, // a buffer that is not aligned
		{size - 10, src[size-10:]},                                   // the tail, up to the end
	}
	for _, wr := range writes {
		n, err := w.WriteAt(wr.p, wr.off)
		if err != nil || n != len(wr.p) {
			t.Fatalf("WriteAt(%d bytes at %d) = %d, %v", len(wr.p), wr.off, n, err)
		}
		copy(want[wr.off:], wr.p)
	}
	back := make([]byte, align+5)
	if _, err := w.ReadAt(back, 17); err != nil || !bytes.Equal(back, want[17:17+align+5]) {
		t.Fatalf("ReadAt of what was just written: %v, same bytes %v", err, bytes.Equal(back, want[17:17+align+5]))
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("file holds %d bytes that differ from the %d expected", len(got), len(want))
	}
}

func TestPreadReportsTheEndOfTheFileAsAShortCount(t *testing.T) {
	path, want := patternFile(t, align+100)
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 2*align)
	n, err := pread(f, buf, 50)
	if err != nil || n != align+50 || !bytes.Equal(buf[:n], want[50:]) {
		t.Fatalf("pread across the end = %d, %v; want %d bytes, no error", n, err, align+50)
	}
	if n, err := pread(f, buf, align+100); n != 0 || err != nil {
		t.Fatalf("pread at the end = %d, %v; want 0, no error", n, err)
	}
}

func TestAlignedBufferIsZeroedPageAlignedWritableMemory(t *testing.T) {
	for _, n := range []int{1, align - 1, align, bufSize + 3} {
		b, err := AlignedBuffer(n)
		if err != nil {
			t.Fatal(err)
		}
		if len(b) != n || cap(b) != n || !bytes.Equal(b, make([]byte, n)) {
			t.Fatalf("AlignedBuffer(%d) = %d bytes (cap %d), zero: %v", n, len(b), cap(b), bytes.Equal(b, make([]byte, len(b))))
		}
		if addr := uintptr(unsafe.Pointer(unsafe.SliceData(b))); addr%uintptr(os.Getpagesize()) != 0 {
			t.Errorf("AlignedBuffer(%d) starts at %#x, not on a page boundary", n, addr)
		}
		copy(b[n-1:], "e")
		if b[n-1] != 'e' {
			t.Fatal("the end of the buffer did not keep what was written")
		}
		if err := FreeBuffer(b); err != nil {
			t.Fatal(err)
		}
	}
}

var _ io.ReaderAt = (*WriterAt)(nil)
