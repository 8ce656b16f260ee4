package scratch

import (
	"bytes"
	"errors"
	"io"
	"os"
	"testing"
)

func TestWriterReportsTheWriteError(t *testing.T) {
	// /dev/full fails every write with ENOSPC, as a full scratch disk does.
	w := &Writer{f: mustOpen(t, "/dev/full")}
	var err error
	if w.mem, err = alignedBuffer(bufSize); err != nil {
		t.Fatal(err)
	}
	w.buf = w.mem
	_, err = io.Copy(w, bytes.NewReader(pattern(bufSize+1)))
	if err == nil {
		t.Fatal("a write to a full device succeeded")
	}
	if cerr := w.Close(); cerr == nil {
		t.Fatal("Close wrote the tail to a full device without an error")
	}
	if _, err := w.Write([]byte{1}); !errors.Is(err, os.ErrClosed) {
		t.Fatalf("Write after Close: err = %v, want os.ErrClosed", err)
	}
}

func mustOpen(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	return f
}
