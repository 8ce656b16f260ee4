package nbd

import (
	"encoding/binary"
	"fmt"
	"io"
)

var be = binary.BigEndian

// Handshake constants from the NBD protocol (doc/proto.md in
// github.com/NetworkBlockDevice/nbd).
const (
	nbdMagic = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic = 0x49484156454f5054 // "IHAVEOPT"
	repMagic = 0x0003e889045565a9

	flagFixedNewstyle = 1 << 0
	flagNoZeroes      = 1 << 1

	optExportName = 1
	optAbort      = 2
	optList       = 3
	optInfo       = 6
	optGo         = 7

	repAck        = 1
	repServer     = 2
	repInfo       = 3
	repErrUnsup   = 1<<31 + 1
	repErrInvalid = 1<<31 + 3

	infoExport    = 0
	infoBlockSize = 3

	transmissionFlags = 1<<0 | // HAS_FLAGS
		1<<2 | // SEND_FLUSH
		1<<3 | // SEND_FUA
		1<<5 | // SEND_TRIM
		1<<6 // SEND_WRITE_ZEROES

	// maxOption bounds what a client can make us allocate before it has
	// sent anything valid; real options carry at most an export name.
	maxOption = 64 << 10
	// preferredBlock is the page size, which keeps qemu-img's writes
	// aligned for a Device that writes with O_DIRECT.
	preferredBlock = 4096
	// maxPayload is the largest READ or WRITE we accept, advertised as the
	// maximum block size so a conforming client never exceeds it.
	maxPayload = 32 << 20
)

// negotiate runs the fixed newstyle handshake. It reports whether the
// client chose the export and the transmission phase follows; false with a
// nil error means the client aborted.
func (c *conn) negotiate() (bool, error) {
	greeting := be.AppendUint64(nil, nbdMagic)
	greeting = be.AppendUint64(greeting, optMagic)
	greeting = be.AppendUint16(greeting, flagFixedNewstyle|flagNoZeroes)
	c.w.Write(greeting)
	if err := c.w.Flush(); err != nil {
		return false, fmt.Errorf("send greeting: %w", err)
	}

	var f [4]byte
	if _, err := io.ReadFull(c.r, f[:]); err != nil {
		return false, fmt.Errorf("read client flags: %w", err)
	}
	flags := be.Uint32(f[:])
	// Without fixed newstyle a client cannot take an error reply to an
	// option, and the spec has a server drop a client that claims a flag
	// it was not offered.
	if flags&flagFixedNewstyle == 0 || flags&^(flagFixedNewstyle|flagNoZeroes) != 0 {
		return false, fmt.Errorf("client flags %#x: want fixed newstyle and nothing unknown", flags)
	}
	noZeroes := flags&flagNoZeroes != 0

	for {
		var h [16]byte
		if _, err := io.ReadFull(c.r, h[:]); err != nil {
			return false, fmt.Errorf("read option: %w", err)
		}
		if m := be.Uint64(h[0:]); m != optMagic {
			return false, fmt.Errorf("option magic %#x", m)
		}
		opt, n := be.Uint32(h[8:]), be.Uint32(h[12:])
		if n > maxOption {
			return false, fmt.Errorf("option %d: %d bytes of data exceeds %d", opt, n, maxOption)
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(c.r, data); err != nil {
			return false, fmt.Errorf("read option %d data: %w", opt, err)
		}

		switch opt {
		case optExportName:
			b := be.AppendUint64(nil, uint64(c.size))
			b = be.AppendUint16(b, transmissionFlags)
			if !noZeroes {
				b = append(b, make([]byte, 124)...)
			}
			c.w.Write(b)
			return true, c.flush("export name")
		case optAbort:
			c.optReply(opt, repAck, nil)
			return false, c.flush("abort")
		case optList:
			c.optReply(opt, repServer, be.AppendUint32(nil, 0)) // the one export, ""
			c.optReply(opt, repAck, nil)
		case optInfo, optGo:
			if !validInfoRequest(data) {
				c.optReply(opt, repErrInvalid, nil)
				break
			}
			export := be.AppendUint16(nil, infoExport)
			export = be.AppendUint64(export, uint64(c.size))
			export = be.AppendUint16(export, transmissionFlags)
			c.optReply(opt, repInfo, export)
			// Sent whether or not the client asked: the maximum is what
			// keeps a conforming client's payloads within maxPayload.
			block := be.AppendUint16(nil, infoBlockSize)
			block = be.AppendUint32(block, 1)
			block = be.AppendUint32(block, preferredBlock)
			block = be.AppendUint32(block, maxPayload)
			c.optReply(opt, repInfo, block)
			c.optReply(opt, repAck, nil)
			if opt == optGo {
				return true, c.flush("go")
			}
		default:
			// Structured replies, metadata contexts and TLS included: simple
			// replies suffice for a client that only writes, and the socket
			// is private to the job.
			c.log.Debug("nbd option refused", "option", opt)
			c.optReply(opt, repErrUnsup, nil)
		}
		if err := c.flush(fmt.Sprintf("option %d", opt)); err != nil {
			return false, err
		}
	}
}

// validInfoRequest reports whether data is a well-formed NBD_OPT_INFO or
// NBD_OPT_GO request: a name length, the name, a count and that many u16
// information types. The name itself is ignored; every name is the export.
func validInfoRequest(data []byte) bool {
	if len(data) < 4 {
		return false
	}
	name := uint64(be.Uint32(data))
	rest := data[4:]
	if uint64(len(rest)) < name+2 {
		return false
	}
	rest = rest[name:]
	return len(rest) == 2+2*int(be.Uint16(rest))
}

// optReply buffers an option reply; errors surface at the next flush.
func (c *conn) optReply(opt, typ uint32, data []byte) {
	b := be.AppendUint64(make([]byte, 0, 20+len(data)), repMagic)
	b = be.AppendUint32(b, opt)
	b = be.AppendUint32(b, typ)
	b = be.AppendUint32(b, uint32(len(data)))
	c.w.Write(append(b, data...))
}

func (c *conn) flush(what string) error {
	if err := c.w.Flush(); err != nil {
		return fmt.Errorf("reply to %s: %w", what, err)
	}
	return nil
}
