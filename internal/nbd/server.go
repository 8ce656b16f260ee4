package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"

	"github.com/imagepipe/imagepipe/internal/scratch"
)

// Device is what an export is backed by. The server calls it from one
// goroutine per connection, one request at a time, in the order the client sent them.
type Device interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Zero makes [off, off+n) read as zeros: NBD_CMD_WRITE_ZEROES and NBD_CMD_TRIM.
	Zero(off, n int64) error
}

// Server serves one export of Size bytes, named "" (any name a client asks for is accepted).
type Server struct {
	Size   int64
	Device Device
	Log    *slog.Logger // nil discards
}

// Serve accepts connections on l and serves each on its own goroutine until the
// client disconnects. It returns when ctx ends or l is closed (closing l and every
// open connection when ctx ends), after every connection goroutine has finished;
// it returns nil in those cases, and only other accept errors otherwise.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	log := s.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}

	var (
		wg    sync.WaitGroup
		mu    sync.Mutex // guards conns
		conns = make(map[net.Conn]struct{})
	)
	// Closing is the only way to wake a goroutine blocked in Accept or Read.
	closed := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(closed)
		l.Close()
		mu.Lock()
		defer mu.Unlock()
		for c := range conns {
			c.Close()
		}
	})
	// Deferred in this order so that connections are waited for first: a
	// ctx ending during that wait must still close them. Waiting for the
	// closing function too means no goroutine of ours outlives Serve.
	defer func() {
		if !stop() {
			<-closed
		}
	}()
	defer wg.Wait()

	for {
		nc, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("nbd: accept: %w", err)
		}
		mu.Lock()
		// Checked under mu: either the closing function has already run and
		// will not see nc, or it runs later and closes nc with the rest.
		if ctx.Err() != nil {
			mu.Unlock()
			nc.Close()
			return nil
		}
		conns[nc] = struct{}{}
		mu.Unlock()

		wg.Go(func() {
			s.serveConn(nc, log)
			mu.Lock()
			delete(conns, nc)
			mu.Unlock()
		})
	}
}

// serveConn runs one connection from greeting to disconnect.
func (s *Server) serveConn(nc net.Conn, log *slog.Logger) {
	c := &conn{
		size: s.Size,
		dev:  s.Device,
		r:    bufio.NewReader(nc),
		w:    bufio.NewWriter(nc),
		log:  log,
	}
	defer nc.Close()
	defer c.freeBuffer()

	transmit, err := c.negotiate()
	if err == nil && transmit {
		err = c.transmit()
	}
	switch {
	case err == nil, errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed):
		// The client left, or Serve closed the connection on shutdown.
		log.Debug("nbd connection closed", "err", err)
	default:
		log.Warn("nbd connection dropped", "err", err)
	}
}

// conn is one client connection. Its requests are run strictly one after
// another: the caller relies on seeing writes in the order the client sent
// them, and a Device need not be safe for concurrent use within a connection.
type conn struct {
	size int64
	dev  Device
	r    *bufio.Reader
	w    *bufio.Writer
	log  *slog.Logger
	buf  []byte // page-aligned payload mapping, grown on demand
}

// minBuffer is the first payload mapping; doubling from a power of two
// reaches maxPayload exactly, and every size is a whole number of pages.
const minBuffer = 64 << 10

// buffer returns n bytes of page-aligned memory for a payload: the Device
// may write it with O_DIRECT (see package scratch). It is reused across
// requests, so one conversion maps memory a handful of times rather than
// per write.
func (c *conn) buffer(n uint32) ([]byte, error) {
	if int(n) > len(c.buf) {
		size := max(minBuffer, len(c.buf))
		for size < int(n) {
			size *= 2
		}
		b, err := scratch.AlignedBuffer(size)
		if err != nil {
			return nil, fmt.Errorf("map %d byte buffer: %w", size, err)
		}
		c.freeBuffer()
		c.buf = b
	}
	return c.buf[:n], nil
}

func (c *conn) freeBuffer() {
	if c.buf != nil {
		scratch.FreeBuffer(c.buf)
		c.buf = nil
	}
}
