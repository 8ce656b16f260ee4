package nbd

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"
)

// call is one Device call as the server made it.
type call struct {
	op      string // "read", "write" or "zero"
	off, n  int64
	aligned bool // the buffer started on a page boundary (reads and writes)
}

// memDevice is an in-memory Device that records every call. fail, when
// set, may fail a call before it touches data.
type memDevice struct {
	mu    sync.Mutex
	data  []byte
	calls []call
	fail  func(call) error
}

var _ Device = (*memDevice)(nil)

func newMemDevice(size int64) *memDevice { return &memDevice{data: make([]byte, size)} }

func (d *memDevice) record(c call) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.calls = append(d.calls, c)
	if d.fail != nil {
		return d.fail(c)
	}
	return nil
}

func pageAligned(p []byte) bool {
	return len(p) > 0 && uintptr(unsafe.Pointer(&p[0]))%uintptr(os.Getpagesize()) == 0
}

func (d *memDevice) ReadAt(p []byte, off int64) (int, error) {
	if err := d.record(call{"read", off, int64(len(p)), pageAligned(p)}); err != nil {
		return 0, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if off >= int64(len(d.data)) {
		return 0, io.EOF
	}
	// A read that reaches the end reports io.EOF even when full, as
	// io.ReaderAt allows, so the server's handling of that is exercised.
	n := copy(p, d.data[off:])
	if off+int64(n) == int64(len(d.data)) {
		return n, io.EOF
	}
	return n, nil
}

func (d *memDevice) WriteAt(p []byte, off int64) (int, error) {
	if err := d.record(call{"write", off, int64(len(p)), pageAligned(p)}); err != nil {
		return 0, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if off+int64(len(p)) > int64(len(d.data)) {
		return 0, errors.New("write past the end of the device")
	}
	return copy(d.data[off:], p), nil
}

func (d *memDevice) Zero(off, n int64) error {
	if err := d.record(call{op: "zero", off: off, n: n}); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	clear(d.data[off : off+n])
	return nil
}

// snapshot returns a copy of the device's bytes and calls.
func (d *memDevice) snapshot() ([]byte, []call) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]byte(nil), d.data...), append([]call(nil), d.calls...)
}

// socketPath returns a path for a unix socket in a fresh directory that
// the test removes. Socket paths are limited to 108 bytes, and a long
// TMPDIR or test name can push t.TempDir() past that.
func socketPath(t *testing.T) string {
	t.Helper()
	if p := filepath.Join(t.TempDir(), "nbd.sock"); len(p) < 100 {
		return p
	}
	dir, err := os.MkdirTemp("", "nbd")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "nbd.sock")
}

// testLogger writes the server's log, debug included, to the test's output.
func testLogger(t *testing.T) *slog.Logger {
	t.Helper()
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(p), "\n"))
	return len(p), nil
}

// running is a Server serving on a unix socket from its own goroutine.
type running struct {
	sock   string
	l      net.Listener
	cancel context.CancelFunc
	done   chan error // receives Serve's result
}

// start runs s on a fresh socket, logging to the test unless s has a Log.
// Cleanup cancels Serve and fails the test unless it returns nil promptly.
func start(t *testing.T, s *Server) *running {
	t.Helper()
	if s.Log == nil {
		s.Log = testLogger(t)
	}
	sock := socketPath(t)
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{sock: sock, l: l, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- s.Serve(ctx, l) }()
	t.Cleanup(func() {
		cancel()
		if err := r.wait(t); err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return r
}

// wait returns what Serve returned, failing the test if it takes too long.
func (r *running) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-r.done:
		r.done <- err // for the next wait, and Cleanup's
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return")
		return nil
	}
}

// serverGoroutines returns the stacks of goroutines running this package's
// server code, polling briefly because a goroutine that has signalled its
// WaitGroup still takes a moment to exit.
func serverGoroutines(t *testing.T) []string {
	t.Helper()
	var found []string
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		found = found[:0]
		for _, g := range strings.Split(string(buf), "\n\n") {
			if strings.Contains(g, "internal/nbd.(*Server)") || strings.Contains(g, "internal/nbd.(*conn)") {
				found = append(found, g)
			}
		}
		if len(found) == 0 {
			return nil
		}
	}
	return found
}
