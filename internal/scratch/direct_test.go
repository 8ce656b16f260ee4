package scratch

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"testing/iotest"
)

// pattern is n bytes that differ at every offset a misplaced block could
// land on.
func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i/4093)
	}
	return b
}

func TestWriterStoresExactlyTheBytesWritten(t *testing.T) {
	dir := t.TempDir()
	if Supported(dir) != usesODirect {
		t.Fatalf("Supported(%s) = %v in a build where O_DIRECT is used: %v; the test needs a file system that supports it (ext4, xfs, tmpfs since Linux 6.6)", dir, !usesODirect, usesODirect)
	}
	sizes := []int{0, 1, align - 1, align, align + 1, bufSize - 1, bufSize, bufSize + align + 17, 3*bufSize + 5}
	for _, size := range sizes {
		want := pattern(size)
		for name, write := range map[string]func(w *Writer) error{
			// Odd-sized writes straddle the buffer's end.
			"Write": func(w *Writer) error {
				for p := want; len(p) > 0; {
					n := min(len(p), 100_003)
					if _, err := w.Write(p[:n]); err != nil {
						return err
					}
					p = p[n:]
				}
				return nil
			},
			// Short reads leave the buffer partly filled between reads.
			"ReadFrom": func(w *Writer) error {
				n, err := io.Copy(w, iotest.HalfReader(bytes.NewReader(want)))
				if err == nil && n != int64(size) {
					t.Errorf("io.Copy reported %d bytes, want %d", n, size)
				}
				return err
			},
		} {
			path := filepath.Join(dir, name+"-"+strconv.Itoa(size))
			w, err := Create(path)
			if err != nil {
				t.Fatal(err)
			}
			if w.Direct() != usesODirect {
				t.Errorf("%s: Direct() = %v in a build where O_DIRECT is used: %v", path, w.Direct(), usesODirect)
			}
			if err := write(w); err != nil {
				t.Fatalf("%s: %v", path, err)
			}
			if err := w.Close(); err != nil {
				t.Fatalf("%s: close: %v", path, err)
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s: file holds %d bytes that differ from the %d written", path, len(got), len(want))
			}
		}
	}
}

func TestCreateRefusesAnExistingFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "input")
	if err := os.WriteFile(path, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Create(path); !errors.Is(err, os.ErrExist) {
		t.Fatalf("Create over an existing file: err = %v, want os.ErrExist", err)
	}
	if got, _ := os.ReadFile(path); string(got) != "keep me" {
		t.Fatalf("existing file changed to %q", got)
	}
}

// misaligned is a buffer of n bytes, in a mapping of its own, that
// O_DIRECT refuses, as it refuses ours on a file system that wants a
// larger alignment.
func misaligned(t *testing.T, n int) (mem, buf []byte) {
	t.Helper()
	mem, err := alignedBuffer(n + align)
	if err != nil {
		t.Fatal(err)
	}
	return mem, mem[1 : n+1 : n+1]
}

func TestWriterFallsBackToBufferedWritesWhenODirectIsRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "out")
	w, err := Create(path)
	if err != nil {
		t.Fatal(err)
	}
	freeBuffer(w.mem)
	w.mem, w.buf = misaligned(t, bufSize)
	want := pattern(2*bufSize + align + 100)
	if _, err := w.Write(want); err != nil {
		t.Fatalf("Write: %v", err)
	}
	if w.Direct() {
		t.Error("still O_DIRECT after the file system refused it")
	}
	if err := w.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("file holds %d bytes that differ from the %d written", len(got), len(want))
	}
}
