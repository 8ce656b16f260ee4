package scratch

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// patternFile writes size patterned bytes through the page cache, as a
// file another program wrote would be.
func patternFile(t *testing.T, size int) (string, []byte) {
	t.Helper()
	want := pattern(size)
	path := filepath.Join(t.TempDir(), "data")
	if err := os.WriteFile(path, want, 0o600); err != nil {
		t.Fatal(err)
	}
	return path, want
}

func openDirect(t *testing.T, path string) *directReader {
	t.Helper()
	f, err := openDirectReader(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	if f.Direct() != usesODirect {
		t.Fatalf("%s: Direct() = %v in a build where O_DIRECT is used: %v", path, f.Direct(), usesODirect)
	}
	return f
}

func TestReadAtMatchesTheFileAnywhere(t *testing.T) {
	// The end falls mid-block, where a direct read comes back short.
	size := 3*windowSize + align + 17
	path, want := patternFile(t, size)
	f := openDirect(t, path)
	r := rand.New(rand.NewPCG(5, 6))
	type read struct{ off, n int }
	reads := []read{
		{0, 1}, {windowSize - 3, 6}, {0, size}, {size - 1, 1}, {size - 20, 40},
		{size, 10}, {size + windowSize, 1}, {align - 1, 2*windowSize + 2},
	}
	for range 300 {
		off := r.IntN(size + 100)
		reads = append(reads, read{off, 1 + r.IntN(3*windowSize/2)})
	}
	for _, rd := range reads {
		p := make([]byte, rd.n)
		n, err := f.ReadAt(p, int64(rd.off))
		wantN := max(0, min(rd.n, size-rd.off))
		if n != wantN {
			t.Fatalf("ReadAt(%d bytes at %d) = %d bytes, want %d (err %v)", rd.n, rd.off, n, wantN, err)
		}
		if wantN < rd.n && err != io.EOF {
			t.Fatalf("ReadAt(%d bytes at %d) past the end: err = %v, want io.EOF", rd.n, rd.off, err)
		}
		if wantN == rd.n && err != nil {
			t.Fatalf("ReadAt(%d bytes at %d): %v", rd.n, rd.off, err)
		}
		if n > 0 && !bytes.Equal(p[:n], want[rd.off:rd.off+n]) {
			t.Fatalf("ReadAt(%d bytes at %d) returned other bytes than the file holds", rd.n, rd.off)
		}
	}
}

func TestMoreConcurrentReadersThanWindowsSeeTheirOwnBytes(t *testing.T) {
	const readers = 3 * windows
	part := 2*windowSize + 12345
	path, want := patternFile(t, readers*part)
	f := openDirect(t, path)
	var wg sync.WaitGroup
	errs := make(chan error, readers)
	for i := range readers {
		wg.Go(func() {
			got, err := io.ReadAll(io.NewSectionReader(f, int64(i*part), int64(part)))
			if err == nil && !bytes.Equal(got, want[i*part:(i+1)*part]) {
				err = errors.New("bytes differ")
			}
			if err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("a reader of its own part: %v", err)
	}
}

func TestReaderFallsBackToBufferedReadsWhenODirectIsRefused(t *testing.T) {
	path, want := patternFile(t, 3*windowSize)
	f := openDirect(t, path)
	mem, buf := misaligned(t, windowSize)
	defer freeBuffer(mem)
	n, err := f.fill(buf, windowSize)
	if err != nil || n != windowSize || !bytes.Equal(buf, want[windowSize:2*windowSize]) {
		t.Fatalf("fill after O_DIRECT refused: %d bytes, %v, same bytes %v", n, err, bytes.Equal(buf[:n], want[windowSize:windowSize+n]))
	}
	// Later reads go through the page cache and still see the file.
	p := make([]byte, 1000)
	if _, err := f.ReadAt(p, 2*windowSize+5); err != nil || !bytes.Equal(p, want[2*windowSize+5:2*windowSize+1005]) {
		t.Fatalf("ReadAt after the fallback: %v", err)
	}
}
