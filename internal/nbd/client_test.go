package nbd

import (
	"bytes"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// client speaks the protocol by hand, so tests can send what qemu never
// would. Every method fails the test on an I/O error.
type client struct {
	t  *testing.T
	nc net.Conn
}

func dial(t *testing.T, sock string) *client {
	t.Helper()
	nc, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	return &client{t: t, nc: nc}
}

// send writes the big-endian encoding of each value: uint16, uint32,
// uint64 or []byte.
func (c *client) send(vals ...any) {
	c.t.Helper()
	var b []byte
	for _, v := range vals {
		switch v := v.(type) {
		case uint16:
			b = be.AppendUint16(b, v)
		case uint32:
			b = be.AppendUint32(b, v)
		case uint64:
			b = be.AppendUint64(b, v)
		case []byte:
			b = append(b, v...)
		default:
			c.t.Fatalf("send: unsupported %T", v)
		}
	}
	if _, err := c.nc.Write(b); err != nil {
		c.t.Fatalf("send: %v", err)
	}
}

func (c *client) read(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.nc, b); err != nil {
		c.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

// greet checks the server's greeting and answers with flags.
func (c *client) greet(flags uint32) {
	c.t.Helper()
	g := c.read(18)
	c.field("greeting magic", be.Uint64(g), nbdMagic)
	c.field("greeting option magic", be.Uint64(g[8:]), optMagic)
	c.field("handshake flags", uint64(be.Uint16(g[16:])), flagFixedNewstyle|flagNoZeroes)
	c.send(flags)
}

// field fails the test unless a header field read from the server holds
// want.
func (c *client) field(name string, got, want uint64) {
	c.t.Helper()
	if got != want {
		c.t.Fatalf("%s %#x, want %#x", name, got, want)
	}
}

func (c *client) option(opt uint32, data []byte) {
	c.t.Helper()
	c.send(uint64(optMagic), opt, uint32(len(data)), data)
}

// optReply reads one option reply, checking it answers opt.
func (c *client) optReply(opt uint32) (typ uint32, data []byte) {
	c.t.Helper()
	h := c.read(20)
	c.field("option reply magic", be.Uint64(h), repMagic)
	c.field("reply to option", uint64(be.Uint32(h[8:])), uint64(opt))
	return be.Uint32(h[12:]), c.read(int(be.Uint32(h[16:])))
}

// goExport negotiates the export with NBD_OPT_GO and checks its replies
// describe an export of size bytes.
func (c *client) goExport(size int64) {
	c.t.Helper()
	// Any name will do: the server has one export and accepts every name.
	c.option(optGo, infoRequest("disk", infoBlockSize))
	c.checkInfo(optGo, size)
}

// infoRequest is the data of an NBD_OPT_INFO or NBD_OPT_GO.
func infoRequest(name string, types ...uint16) []byte {
	b := be.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = be.AppendUint16(b, uint16(len(types)))
	for _, ty := range types {
		b = be.AppendUint16(b, ty)
	}
	return b
}

// checkInfo reads the replies to NBD_OPT_INFO or NBD_OPT_GO.
func (c *client) checkInfo(opt uint32, size int64) {
	c.t.Helper()
	wantExport := be.AppendUint16(be.AppendUint64(be.AppendUint16(nil, infoExport), uint64(size)), transmissionFlags)
	wantBlock := be.AppendUint32(be.AppendUint32(be.AppendUint32(be.AppendUint16(nil, infoBlockSize), 1), 4096), 32<<20)
	for _, want := range [][]byte{wantExport, wantBlock} {
		typ, data := c.optReply(opt)
		if typ != repInfo || !bytes.Equal(data, want) {
			c.t.Fatalf("option %d: reply %#x %x, want info %x", opt, typ, data, want)
		}
	}
	if typ, data := c.optReply(opt); typ != repAck || len(data) != 0 {
		c.t.Fatalf("option %d: reply %#x %x, want ack", opt, typ, data)
	}
}

// request sends one request, with payload for a WRITE.
func (c *client) request(typ uint16, handle, off uint64, n uint32, payload []byte) {
	c.t.Helper()
	c.send(uint32(reqMagic), uint16(0), typ, handle, off, n, payload)
}

// reply reads a simple reply to handle and returns its error, and dataLen
// bytes of data when the error is zero.
func (c *client) reply(handle uint64, dataLen int) (uint32, []byte) {
	c.t.Helper()
	h := c.read(16)
	c.field("reply magic", uint64(be.Uint32(h)), replyMagic)
	c.field("reply to handle", be.Uint64(h[8:]), handle)
	errno := be.Uint32(h[4:])
	if errno != 0 {
		return errno, nil
	}
	return 0, c.read(dataLen)
}

// readBack reads [off, off+n) and fails unless it succeeds with want.
func (c *client) readBack(handle, off uint64, want []byte) {
	c.t.Helper()
	c.request(cmdRead, handle, off, uint32(len(want)), nil)
	if errno, got := c.reply(handle, len(want)); errno != 0 || !bytes.Equal(got, want) {
		c.t.Fatalf("read %d bytes at %d: error %d, data matches %v", len(want), off, errno, bytes.Equal(got, want))
	}
}

// closed fails the test unless the server closes the connection without
// sending anything more. Linux reports ECONNRESET rather than EOF when the
// server closed with bytes of ours still unread.
func (c *client) closed() {
	c.t.Helper()
	var b [1]byte
	n, err := c.nc.Read(b[:])
	if n != 0 || !(errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
		c.t.Fatalf("read after the server should have closed: %d bytes, %v", n, err)
	}
}
