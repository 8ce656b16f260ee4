package nbd

import (
	"errors"
	"fmt"
	"io"
	"syscall"
)

const (
	reqMagic   = 0x25609513
	replyMagic = 0x67446698

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6

	// The protocol's error values are fixed, whatever the platform's errno.
	errIO       = 5
	errInval    = 22
	errNoSpc    = 28
	errOverflow = 75
)

// transmit serves requests until the client disconnects, one at a time:
// read it, run it, reply, then read the next.
func (c *conn) transmit() error {
	var h [28]byte
	for {
		if _, err := io.ReadFull(c.r, h[:]); err != nil {
			return fmt.Errorf("read request: %w", err)
		}
		// After a bad magic nothing says where the next request starts.
		if m := be.Uint32(h[0:]); m != reqMagic {
			return fmt.Errorf("request magic %#x", m)
		}
		typ, handle := be.Uint16(h[6:]), be.Uint64(h[8:])
		off, n := be.Uint64(h[16:]), be.Uint32(h[24:])
		if typ == cmdDisc {
			return nil
		}
		errno, data, err := c.do(typ, off, n)
		if err != nil {
			return err
		}
		if err := c.reply(handle, errno, data); err != nil {
			return err
		}
	}
}

// do runs one request. It returns the protocol error for the reply (0 for
// success) and, for a READ, the data; an error ends the connection.
// Command flags need no handling: FUA asks for what every write already
// gets, and NO_HOLE changes nothing for a Device that just reads as zeros.
func (c *conn) do(typ uint16, off uint64, n uint32) (uint32, []byte, error) {
	switch typ {
	case cmdRead:
		if n > maxPayload {
			return errOverflow, nil, nil
		}
		if !c.inRange(off, n) {
			return errInval, nil, nil
		}
		p, err := c.buffer(n)
		if err != nil {
			return 0, nil, err
		}
		got, err := c.dev.ReadAt(p, int64(off))
		if got == len(p) && errors.Is(err, io.EOF) {
			err = nil // io.ReaderAt may report EOF with a full read
		} else if err == nil && got < len(p) {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			return c.deviceError("read", off, err), nil, nil
		}
		return 0, p, nil

	case cmdWrite:
		if n > maxPayload {
			// The client ignored the advertised maximum, so it is broken
			// or hostile; reading up to 4 GiB only to refuse it would keep
			// a stream in sync that nothing should trust any more.
			return 0, nil, fmt.Errorf("write of %d bytes at %d exceeds the maximum %d", n, off, maxPayload)
		}
		if !c.inRange(off, n) {
			if _, err := io.CopyN(io.Discard, c.r, int64(n)); err != nil {
				return 0, nil, fmt.Errorf("discard write payload: %w", err)
			}
			return errInval, nil, nil
		}
		p, err := c.buffer(n)
		if err != nil {
			return 0, nil, err
		}
		if _, err := io.ReadFull(c.r, p); err != nil {
			return 0, nil, fmt.Errorf("read write payload: %w", err)
		}
		got, err := c.dev.WriteAt(p, int64(off))
		if err == nil && got < len(p) {
			err = io.ErrShortWrite
		}
		if err != nil {
			return c.deviceError("write", off, err), nil, nil
		}
		return 0, nil, nil

	case cmdFlush:
		// Nothing is cached here: every write reached the Device before it
		// was acknowledged, and the caller decides what durable means once
		// qemu-img has exited.
		return 0, nil, nil

	case cmdTrim, cmdWriteZeroes:
		if !c.inRange(off, n) {
			return errInval, nil, nil
		}
		if err := c.dev.Zero(int64(off), int64(n)); err != nil {
			return c.deviceError("zero", off, err), nil, nil
		}
		return 0, nil, nil
	}
	return errInval, nil, nil
}

// inRange reports whether [off, off+n) lies within the export, without
// overflowing on a client's huge offset.
func (c *conn) inRange(off uint64, n uint32) bool {
	size := uint64(c.size)
	return off <= size && uint64(n) <= size-off
}

// deviceError logs a failed Device call and picks its protocol error:
// ENOSPC lets qemu-img report a full disk as such; everything else is EIO.
func (c *conn) deviceError(op string, off uint64, err error) uint32 {
	c.log.Warn("nbd device error", "op", op, "offset", off, "err", err)
	if errors.Is(err, syscall.ENOSPC) {
		return errNoSpc
	}
	return errIO
}

// reply sends a simple reply and flushes it, so the client never waits on
// a reply sitting in our buffer.
func (c *conn) reply(handle uint64, errno uint32, data []byte) error {
	var h [16]byte
	be.PutUint32(h[0:], replyMagic)
	be.PutUint32(h[4:], errno)
	be.PutUint64(h[8:], handle)
	c.w.Write(h[:])
	c.w.Write(data)
	if err := c.w.Flush(); err != nil {
		return fmt.Errorf("send reply: %w", err)
	}
	return nil
}
