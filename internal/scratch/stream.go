package scratch

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
)

// ErrOutOfOrder fails a Stream whose writer went back below bytes it had
// already finished: what its readers saw may have changed since.
var ErrOutOfOrder = errors.New("the writer went back to bytes already read")

// errStreamClosed ends the reads of a Stream closed under them.
var errStreamClosed = errors.New("stream closed")

// Stream is a file that one writer fills at increasing offsets while
// others read what it has finished. It carries the raw output of qemu-img
// convert, written through package nbd, to the hash and the upload while
// qemu-img is still converting the rest: qemu-img writes a raw target in
// order, one request at a time, and with --target-is-zero never writes
// runs of zeros, so every byte below the end of its latest write is final.
//
// A write below that point breaks the promise. The stream then fails its
// readers with ErrOutOfOrder but still takes every write, so that once
// the writer is done the file is complete and can be read the ordinary
// way (Open).
type Stream struct {
	w    *WriterAt
	r    *directReader
	size int64

	mu      sync.Mutex
	changed chan struct{} // closed and replaced when final or err changes
	data    []extent      // sorted, disjoint; only below final
	final   int64         // bytes below it never change again
	done    bool          // Finish was called
	err     error         // why readers stop; set once
	broken  bool          // the writer broke the order
}

// CreateStream creates path, which must not exist, as a file of size
// bytes that reads as zeros until written.
func CreateStream(path string, size int64) (*Stream, error) {
	w, err := CreateWriterAt(path, size)
	if err != nil {
		return nil, err
	}
	r, err := openDirectReader(path)
	if err != nil {
		w.Close()
		return nil, err
	}
	return &Stream{w: w, r: r, size: size, changed: make(chan struct{})}, nil
}

// Size is the file's length.
func (s *Stream) Size() int64 { return s.size }

// Writer is the writer's side of the stream.
func (s *Stream) Writer() *StreamWriter { return &StreamWriter{s} }

// Finish tells the readers that the writer is done: the bytes it never
// wrote are zeros. It fails if the stream already has.
func (s *Stream) Finish() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return s.err
	}
	s.final, s.done = s.size, true
	s.signal()
	return nil
}

// Fail ends every read with err, unless the stream has already failed.
func (s *Stream) Fail(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fail(err)
}

func (s *Stream) fail(err error) {
	if s.err == nil {
		s.err = err
		s.signal()
	}
}

func (s *Stream) signal() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// Broken reports whether the writer broke the order: the stream's readers
// failed, but the file holds every write.
func (s *Stream) Broken() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.broken
}

// Wait returns once the bytes below end are final, or with the reason the
// stream failed. The end of the stream is final only once the writer has
// finished, even if it wrote up to it: a reader of the last bytes, such as
// an upload's last part, must not take a writer that may still fail for
// one that is done.
func (s *Stream) Wait(ctx context.Context, end int64) error {
	end = min(end, s.size)
	for {
		s.mu.Lock()
		final, done, err, changed := s.final, s.done, s.err, s.changed
		s.mu.Unlock()
		if err != nil {
			return err
		}
		if final >= end && (end < s.size || done) {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// ReadAt reads final bytes, waiting for the writer as needed. The file
// underneath caches whole windows, so it waits until the window around
// the last byte asked for is final too.
func (s *Stream) ReadAt(p []byte, off int64) (int, error) {
	want, err := readable(len(p), off, s.size)
	if err != nil {
		return 0, err
	}
	if err := s.Wait(context.Background(), roundUp(off+want, windowSize)); err != nil {
		return 0, err
	}
	// Final bytes keep their map even if the stream fails from here on.
	n, err := readMapped(p[:want], off, s.r, func(off int64) (bool, int64) {
		s.mu.Lock()
		defer s.mu.Unlock()
		return regionOf(s.data, s.size, off)
	})
	if err == nil && n < len(p) {
		err = io.EOF
	}
	return n, err
}

// region waits until off is final and maps it like File's.
func (s *Stream) region(off int64) (bool, int64, error) {
	if err := s.Wait(context.Background(), off+1); err != nil {
		return false, 0, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	inData, until := regionOf(s.data, s.size, off)
	return inData, min(until, s.final), nil
}

// Section returns a reader of the n bytes from off that waits for the
// writer as it goes.
func (s *Stream) Section(off, n int64) *Section {
	return &Section{src: s, pos: off, end: min(off+n, s.size)}
}

// Err is why the stream failed: a write error (a full scratch disk, say),
// ErrOutOfOrder, or what Fail was given; nil while it has not.
func (s *Stream) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Close closes the file. Reads still waiting end with an error; none may
// be past waiting.
func (s *Stream) Close() error {
	s.Fail(errStreamClosed)
	return errors.Join(s.w.Close(), s.r.Close())
}

// StreamWriter writes a Stream. Its methods are those package nbd asks of
// a device, and are meant to be called by one goroutine.
type StreamWriter struct{ s *Stream }

// WriteAt writes p at off.
func (w *StreamWriter) WriteAt(p []byte, off int64) (int, error) {
	s := w.s
	if off < 0 || off+int64(len(p)) > s.size {
		return 0, fmt.Errorf("scratch: write of %d bytes at %d past the end of a %d-byte stream", len(p), off, s.size)
	}
	n, err := s.w.WriteAt(p, off)
	if err != nil {
		s.Fail(fmt.Errorf("write the output: %w", err))
		return n, err
	}
	s.advance(off, int64(n), true)
	return n, nil
}

// Zero makes [off, off+n) read as zeros. Past the final bytes nothing was
// ever written, and the file reads as zeros there already.
func (w *StreamWriter) Zero(off, n int64) error {
	s := w.s
	if off < 0 || n < 0 || off+n > s.size {
		return fmt.Errorf("scratch: zeroing %d bytes at %d past the end of a %d-byte stream", n, off, s.size)
	}
	s.mu.Lock()
	below := off < s.final
	s.mu.Unlock()
	if below {
		// Rare enough (the writer broke its order) to write the zeros.
		for done := int64(0); done < n; {
			c := min(int64(len(zeros)), n-done)
			if _, err := s.w.WriteAt(zeros[:c], off+done); err != nil {
				s.Fail(fmt.Errorf("write the output: %w", err))
				return err
			}
			done += c
		}
	}
	s.advance(off, n, false)
	return nil
}

// ReadAt reads what the file holds now, final or not: the writer's own
// reads must never wait for the writer.
func (w *StreamWriter) ReadAt(p []byte, off int64) (int, error) { return w.s.w.ReadAt(p, off) }

// advance records a write of n bytes at off.
func (s *Stream) advance(off, n int64, data bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if off < s.final {
		s.broken = true
		s.fail(ErrOutOfOrder)
	}
	if s.broken || s.err != nil {
		return
	}
	if data && n > 0 {
		last := len(s.data) - 1
		switch {
		case last >= 0 && s.data[last].end >= off:
			s.data[last].end = max(s.data[last].end, off+n)
		case len(s.data) == maxExtents-1:
			// As in File: past the bound the rest counts as data, which
			// reads its zeros from the disk instead of from memory.
			s.data = append(s.data, extent{off, s.size})
		default:
			s.data = append(s.data, extent{off, off + n})
		}
	}
	s.final = off + n
	s.signal()
}

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }
