package scratch

import (
	"errors"
	"io"
	"os"
	"sync"
	"syscall"
)

// Readers keep a few aligned windows of the file: O_DIRECT reads must be
// aligned, and callers such as an HTTP body read 32 KiB at a time, which
// would otherwise cost one disk request each. A window serves one
// sequential reader for a MiB; eight serve the upload's parallel parts and
// a hash side by side.
const (
	windowSize = 1 << 20
	windows    = 8
)

// directReader is a file opened for reading with O_DIRECT where its file
// system allows it. Its windows span windowSize bytes, aligned to it: a
// reader of a file still being written must only ask for bytes whose
// whole window is written. ReadAt takes any offset and length and is safe for concurrent
// use. The file must not change while it is read.
type directReader struct {
	*os.File // for Stat and Seek; read through ReadAt
	direct   bool
	mem      []byte // backs the windows

	mu   sync.Mutex
	wins [windows]window
	tick uint64
}

type window struct {
	off    int64 // aligned; -1 when it holds nothing
	buf    []byte
	n      int   // valid bytes from off; fewer than len(buf) at the end of the file
	err    error // of the read that filled it, other than reaching the end
	loaded chan struct{}
	refs   int
	used   uint64
}

// openDirectReader opens path for reading.
func openDirectReader(path string) (*directReader, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	if setDirect(f, true) != nil {
		return &directReader{File: f}, nil
	}
	mem, err := alignedBuffer(windows * windowSize)
	if err != nil {
		f.Close()
		return nil, err
	}
	r := &directReader{File: f, direct: true, mem: mem}
	for i := range r.wins {
		r.wins[i] = window{off: -1, buf: mem[i*windowSize : (i+1)*windowSize]}
	}
	return r, nil
}

// Direct reports whether reads bypass the page cache.
func (r *directReader) Direct() bool { return r.direct }

// ReadAt reads like os.File.ReadAt.
func (r *directReader) ReadAt(p []byte, off int64) (int, error) {
	if !r.direct {
		return r.File.ReadAt(p, off)
	}
	if off < 0 {
		return 0, errors.New("scratch: negative offset")
	}
	n := 0
	for len(p) > 0 {
		w := r.acquire(off &^ (windowSize - 1))
		i := int(off - w.off)
		c := 0
		if i < w.n {
			c = copy(p, w.buf[i:w.n])
		}
		err := w.err
		r.release(w)
		n += c
		p, off = p[c:], off+int64(c)
		if c == 0 {
			if err == nil {
				err = io.EOF
			}
			return n, err
		}
	}
	return n, nil
}

// acquire returns the window holding off, reading it first if no window
// does. The caller must release it.
func (r *directReader) acquire(off int64) *window {
	r.mu.Lock()
	r.tick++
	var victim *window
	for i := range r.wins {
		w := &r.wins[i]
		if w.off == off {
			w.refs++
			w.used = r.tick
			r.mu.Unlock()
			<-w.loaded
			return w
		}
		if w.refs == 0 && (victim == nil || w.used < victim.used) {
			victim = w
		}
	}
	if victim == nil {
		// More readers at once than windows: this one reads on its own.
		r.mu.Unlock()
		buf, err := alignedBuffer(windowSize)
		if err != nil {
			return &window{off: off, err: err, refs: -1}
		}
		w := &window{off: off, buf: buf, refs: -1}
		w.n, w.err = r.fill(buf, off)
		return w
	}
	*victim = window{off: off, buf: victim.buf, loaded: make(chan struct{}), refs: 1, used: r.tick}
	r.mu.Unlock()
	victim.n, victim.err = r.fill(victim.buf, off)
	close(victim.loaded)
	return victim
}

func (r *directReader) release(w *window) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if w.refs < 0 { // a private window
		if w.buf != nil {
			freeBuffer(w.buf)
		}
		return
	}
	w.refs--
	if w.err != nil && w.refs == 0 {
		w.off = -1 // let the next reader try again
	}
}

// fill reads buf from off until it is full or the file ends. Only the end
// of the file cuts a direct read short, and where it falls need not be
// aligned, so a short read that is not aligned is the end.
func (r *directReader) fill(buf []byte, off int64) (int, error) {
	n, fellBack := 0, false
	for n < len(buf) {
		m, err := pread(r.File, buf[n:], off+int64(n))
		if err == syscall.EINTR {
			continue
		}
		if err == syscall.EINVAL && !fellBack {
			// The file system may want another alignment than ours: read
			// through the page cache from here on.
			fellBack = true
			if setDirect(r.File, false) == nil {
				continue
			}
		}
		if err != nil {
			return n, &os.PathError{Op: "read", Path: r.Name(), Err: err}
		}
		n += m
		if m == 0 || n%align != 0 {
			break
		}
	}
	return n, nil
}

// Close closes the file. No ReadAt may be running.
func (r *directReader) Close() error {
	err := r.File.Close()
	if r.mem != nil {
		if uerr := freeBuffer(r.mem); err == nil {
			err = uerr
		}
		r.mem = nil
	}
	return err
}
