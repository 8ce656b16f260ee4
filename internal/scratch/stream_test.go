package scratch

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func newStream(t *testing.T, size int64) *Stream {
	t.Helper()
	s, err := CreateStream(filepath.Join(t.TempDir(), "out.raw"), size)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// patterned is n bytes that differ from zeros and from each other's runs.
func patterned(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i/512)
	}
	return b
}

// hashAsync hashes the whole stream on another goroutine, as convert does
// while qemu-img still writes.
func hashAsync(s *Stream) <-chan []byte {
	out := make(chan []byte, 1)
	go func() {
		h := sha256.New()
		if _, err := io.Copy(h, s.Section(0, s.Size())); err != nil {
			out <- []byte(err.Error())
			return
		}
		out <- h.Sum(nil)
	}()
	return out
}

func TestStreamReadersSeeExactlyTheWritesOnceFinished(t *testing.T) {
	const size = 8 << 20
	s := newStream(t, size)
	want := make([]byte, size)
	hashed := hashAsync(s)
	w := s.Writer()
	// Aligned and unaligned writes, contiguous and with holes between, as
	// qemu-img sends them for a disk with scattered data.
	for _, wr := range []struct {
		off int64
		n   int
	}{{0, 1 << 20}, {1 << 20, 4096}, {3 << 20, 512}, {3<<20 + 1536, 2 << 20}, {7 << 20, 1<<20 - 4096}} {
		p := patterned(wr.n, byte(wr.off>>12))
		copy(want[wr.off:], p)
		if _, err := w.WriteAt(p, wr.off); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-hashed:
		t.Fatal("the hash finished before the writer did")
	case <-time.After(50 * time.Millisecond):
	}
	if err := s.Finish(); err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(want)
	if got := <-hashed; !bytes.Equal(got, sum[:]) {
		t.Fatalf("hash of the stream %x, of the writes %x", got, sum)
	}
	got := make([]byte, size)
	if _, err := s.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("ReadAt differs from the writes")
	}
	if s.Broken() {
		t.Fatal("in-order writes reported as broken")
	}
}

func TestStreamWaitsForTheWholeWindowAroundARead(t *testing.T) {
	s := newStream(t, 4<<20)
	w := s.Writer()
	if _, err := w.WriteAt(patterned(4096, 1), 0); err != nil {
		t.Fatal(err)
	}
	read := make(chan error, 1)
	p := make([]byte, 4096)
	go func() { _, err := s.ReadAt(p, 0); read <- err }()
	select {
	case err := <-read:
		t.Fatalf("read returned (%v) while the rest of its window could still change", err)
	case <-time.After(50 * time.Millisecond):
	}
	late := patterned(4096, 9)
	if _, err := w.WriteAt(late, 1<<20-4096); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(patterned(512, 3), 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := <-read; err != nil {
		t.Fatal(err)
	}
	// The window now cached must hold the late write, not the zeros that
	// were there when the read began.
	q := make([]byte, 4096)
	if _, err := s.ReadAt(q, 1<<20-4096); err != nil || !bytes.Equal(q, late) {
		t.Fatalf("late write not seen (err %v)", err)
	}
}

func TestStreamWriteBelowFinalBytesFailsReadersButKeepsTheFile(t *testing.T) {
	const size = 2 << 20
	path := filepath.Join(t.TempDir(), "out.raw")
	s, err := CreateStream(path, size)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	w := s.Writer()
	hashed := hashAsync(s)
	a, b := patterned(1<<20, 1), patterned(4096, 7)
	if _, err := w.WriteAt(a, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(b, 4096); err != nil {
		t.Fatal(err)
	}
	if err := w.Zero(8192, 4096); err != nil {
		t.Fatal(err)
	}
	if got := <-hashed; string(got) != ErrOutOfOrder.Error() {
		t.Fatalf("hash ended with %q, want %q", got, ErrOutOfOrder)
	}
	if !s.Broken() {
		t.Fatal("not broken")
	}
	if err := s.Finish(); !errors.Is(err, ErrOutOfOrder) {
		t.Fatalf("Finish = %v, want ErrOutOfOrder", err)
	}
	if err := s.Wait(context.Background(), 1); !errors.Is(err, ErrOutOfOrder) {
		t.Fatalf("Wait = %v", err)
	}
	want := make([]byte, size)
	copy(want, a)
	copy(want[4096:], b)
	clear(want[8192 : 8192+4096])
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("the file does not hold every write in the order made")
	}
}

func TestStreamFailEndsWaitingReadersWithTheCause(t *testing.T) {
	s := newStream(t, 1<<20)
	cause := errors.New("qemu-img exited 1")
	hashed := hashAsync(s)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	waited := make(chan error, 1)
	go func() { waited <- s.Wait(ctx, 1<<20) }()
	s.Fail(cause)
	if err := <-waited; !errors.Is(err, cause) {
		t.Fatalf("Wait = %v", err)
	}
	if got := <-hashed; string(got) != cause.Error() {
		t.Fatalf("hash ended with %q", got)
	}
	if err := s.Finish(); !errors.Is(err, cause) {
		t.Fatalf("Finish after Fail = %v", err)
	}
}

func TestStreamWaitEndsWithItsContext(t *testing.T) {
	s := newStream(t, 1<<20)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := s.Wait(ctx, 1); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait = %v", err)
	}
}

func TestStreamRefusesWritesPastItsEnd(t *testing.T) {
	s := newStream(t, 4096)
	if _, err := s.Writer().WriteAt(make([]byte, 512), 4096-256); err == nil {
		t.Fatal("write past the end accepted")
	}
	if err := s.Writer().Zero(0, 8192); err == nil {
		t.Fatal("zeroing past the end accepted")
	}
}

func TestStreamEndIsFinalOnlyOnceTheWriterFinishes(t *testing.T) {
	s := newStream(t, 8192)
	if _, err := s.Writer().WriteAt(patterned(8192, 5), 0); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if err := s.Wait(ctx, 4096); err != nil {
		t.Fatalf("bytes below the last write not final: %v", err)
	}
	if err := s.Wait(ctx, 8192); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Wait(end) before Finish = %v, want it to wait", err)
	}
	if err := s.Finish(); err != nil {
		t.Fatal(err)
	}
	if err := s.Wait(context.Background(), 8192); err != nil {
		t.Fatal(err)
	}
}
