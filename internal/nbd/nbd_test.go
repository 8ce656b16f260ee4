package nbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"sync"
	"syscall"
	"testing"
	"time"
)

const testSize = 1 << 20

// pattern is n bytes in which a shifted read would not match.
func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + 1)
	}
	return b
}

// transmitting starts a server on a device whose first page holds
// pattern(4096) and returns a client that has entered transmission.
func transmitting(t *testing.T, s *Server) (*memDevice, *client) {
	t.Helper()
	dev := newMemDevice(testSize)
	copy(dev.data, pattern(4096))
	s.Size, s.Device = testSize, dev
	c := dial(t, start(t, s).sock)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.goExport(testSize)
	return dev, c
}

func TestUnknownOptionsAreRefusedAndGoStillWorks(t *testing.T) {
	dev := newMemDevice(testSize)
	copy(dev.data, pattern(4096))
	c := dial(t, start(t, &Server{Size: testSize, Device: dev}).sock)
	c.greet(flagFixedNewstyle | flagNoZeroes)

	for _, opt := range []uint32{
		5,  // STARTTLS
		8,  // STRUCTURED_REPLY
		9,  // LIST_META_CONTEXT
		10, // SET_META_CONTEXT
		11, // EXTENDED_HEADERS
		0xdead,
	} {
		c.option(opt, []byte("some data the server must skip"))
		if typ, data := c.optReply(opt); typ != repErrUnsup || len(data) != 0 {
			t.Fatalf("option %d: reply %#x %x, want ERR_UNSUP", opt, typ, data)
		}
	}

	c.option(optList, nil)
	if typ, data := c.optReply(optList); typ != repServer || !bytes.Equal(data, []byte{0, 0, 0, 0}) {
		t.Fatalf("list: reply %#x %x, want the export named \"\"", typ, data)
	}
	if typ, _ := c.optReply(optList); typ != repAck {
		t.Fatalf("list: reply %#x, want ack", typ)
	}

	c.option(optInfo, infoRequest("", infoExport))
	c.checkInfo(optInfo, testSize)

	c.option(optGo, []byte{0, 0, 0, 9, 'x'}) // name longer than the data
	if typ, _ := c.optReply(optGo); typ != repErrInvalid {
		t.Fatalf("malformed go: reply %#x, want ERR_INVALID", typ)
	}

	c.goExport(testSize)
	c.readBack(1, 0, pattern(4096))
}

func TestExportNameEntersTransmission(t *testing.T) {
	for _, tc := range []struct {
		name     string
		flags    uint32
		zeroPads bool
	}{
		{"with zero padding", flagFixedNewstyle, true},
		{"with NO_ZEROES", flagFixedNewstyle | flagNoZeroes, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := newMemDevice(testSize)
			copy(dev.data, pattern(4096))
			c := dial(t, start(t, &Server{Size: testSize, Device: dev}).sock)
			c.greet(tc.flags)
			c.option(optExportName, []byte("any name at all"))
			b := c.read(10)
			if size, flags := be.Uint64(b), be.Uint16(b[8:]); size != testSize || flags != transmissionFlags {
				t.Fatalf("export: size %d flags %#x, want %d %#x", size, flags, testSize, transmissionFlags)
			}
			if tc.zeroPads {
				if pad := c.read(124); !bytes.Equal(pad, make([]byte, 124)) {
					t.Fatalf("padding %x, want 124 zero bytes", pad)
				}
			}
			// A misplaced padding would shift this reply out of frame.
			c.readBack(1, 0, pattern(4096))
		})
	}
}

func TestAbortIsAcknowledgedThenClosed(t *testing.T) {
	c := dial(t, start(t, &Server{Size: testSize, Device: newMemDevice(testSize)}).sock)
	c.greet(flagFixedNewstyle)
	c.option(optAbort, nil)
	if typ, data := c.optReply(optAbort); typ != repAck || len(data) != 0 {
		t.Fatalf("abort: reply %#x %x, want ack", typ, data)
	}
	c.closed()
}

func TestHandshakeClosesOnProtocolViolations(t *testing.T) {
	for _, tc := range []struct {
		name string
		send func(c *client)
	}{
		{"client without fixed newstyle", func(c *client) { c.greet(flagNoZeroes) }},
		{"client flag never offered", func(c *client) { c.greet(flagFixedNewstyle | 1<<5) }},
		{"option longer than 64 KiB", func(c *client) {
			c.greet(flagFixedNewstyle)
			c.send(uint64(optMagic), uint32(optGo), uint32(64<<10+1))
		}},
		{"bad option magic", func(c *client) {
			c.greet(flagFixedNewstyle)
			c.send(uint64(0x1122334455667788), uint32(optGo), uint32(0))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := newMemDevice(testSize)
			c := dial(t, start(t, &Server{Size: testSize, Device: dev}).sock)
			tc.send(c)
			c.closed()
		})
	}
}

func TestRequestErrorsKeepTheConnectionInSync(t *testing.T) {
	for _, tc := range []struct {
		name    string
		typ     uint16
		off     uint64
		n       uint32
		payload bool // a WRITE's payload follows the request
		want    uint32
	}{
		{"read past the end", cmdRead, testSize - 4096, 8192, false, errInval},
		{"read beyond the end", cmdRead, testSize + 1, 1, false, errInval},
		{"read where offset plus length overflows", cmdRead, math.MaxUint64 - 1, 4096, false, errInval},
		{"read longer than the maximum", cmdRead, 0, 32<<20 + 1, false, errOverflow},
		{"write past the end", cmdWrite, testSize - 4096, 8192, true, errInval},
		{"write where offset plus length overflows", cmdWrite, math.MaxUint64 - 1, 4096, true, errInval},
		{"trim past the end", cmdTrim, testSize - 4096, 8192, false, errInval},
		{"write zeroes past the end", cmdWriteZeroes, testSize, 1, false, errInval},
		{"cache, never advertised", 5, 0, 4096, false, errInval},
		{"block status, never negotiated", 7, 0, 4096, false, errInval},
		{"unknown command", 0x99, 0, 4096, false, errInval},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev, c := transmitting(t, &Server{})
			var payload []byte
			if tc.payload {
				payload = bytes.Repeat([]byte{0xee}, int(tc.n))
			}
			c.request(tc.typ, 7, tc.off, tc.n, payload)
			if errno, _ := c.reply(7, 0); errno != tc.want {
				t.Fatalf("error %d, want %d", errno, tc.want)
			}
			c.readBack(8, 0, pattern(4096))
			if _, calls := dev.snapshot(); len(calls) != 1 {
				t.Errorf("device calls %+v, want only the read back", calls)
			}
		})
	}
}

// recorder keeps the records logged through it.
type recorder struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (r *recorder) Enabled(context.Context, slog.Level) bool { return true }
func (r *recorder) WithAttrs([]slog.Attr) slog.Handler       { return r }
func (r *recorder) WithGroup(string) slog.Handler            { return r }
func (r *recorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.recs = append(r.recs, rec.Clone())
	return nil
}

// warnings returns the attributes of each Warn record, as strings.
func (r *recorder) warnings() []map[string]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var w []map[string]string
	for _, rec := range r.recs {
		if rec.Level != slog.LevelWarn {
			continue
		}
		attrs := map[string]string{"msg": rec.Message}
		rec.Attrs(func(a slog.Attr) bool {
			attrs[a.Key] = a.Value.String()
			return true
		})
		w = append(w, attrs)
	}
	return w
}

func TestDeviceErrorsBecomeNBDErrors(t *testing.T) {
	for _, e := range []struct {
		name string
		err  error
		want uint32
	}{
		{"any error is EIO", errors.New("disk on fire"), errIO},
		{"ENOSPC stays ENOSPC", fmt.Errorf("upload part: %w", syscall.ENOSPC), errNoSpc},
	} {
		for _, op := range []struct {
			name    string
			typ     uint16
			payload []byte
		}{
			{"read", cmdRead, nil},
			{"write", cmdWrite, pattern(4096)},
			{"zero", cmdWriteZeroes, nil},
			{"trim", cmdTrim, nil},
		} {
			t.Run(e.name+"/"+op.name, func(t *testing.T) {
				log := &recorder{}
				dev, c := transmitting(t, &Server{Log: slog.New(log)})
				dev.mu.Lock()
				dev.fail = func(call) error { return e.err }
				dev.mu.Unlock()

				c.request(op.typ, 3, 8192, 4096, op.payload)
				if errno, _ := c.reply(3, 0); errno != e.want {
					t.Fatalf("error %d, want %d", errno, e.want)
				}
				// A FLUSH touches no device, so it proves the stream is still in step.
				c.request(cmdFlush, 4, 0, 0, nil)
				if errno, _ := c.reply(4, 0); errno != 0 {
					t.Fatalf("flush after the failure: error %d", errno)
				}
				w := log.warnings()
				if len(w) != 1 || w[0]["offset"] != "8192" {
					t.Errorf("warnings %v, want one with offset 8192", w)
				}
			})
		}
	}
}

func TestTransmissionClosesWhenTheStreamCannotContinue(t *testing.T) {
	for _, tc := range []struct {
		name string
		send func(c *client)
	}{
		{"bad request magic", func(c *client) {
			c.send(uint32(0x25609514), uint16(0), uint16(cmdRead), uint64(1), uint64(0), uint32(4096))
		}},
		{"write longer than the maximum", func(c *client) {
			c.request(cmdWrite, 1, 0, 32<<20+1, nil)
		}},
		{"disconnect", func(c *client) { c.request(cmdDisc, 1, 0, 0, nil) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev, c := transmitting(t, &Server{})
			tc.send(c)
			c.closed()
			if _, calls := dev.snapshot(); len(calls) != 0 {
				t.Errorf("device calls %+v, want none", calls)
			}
		})
	}
}

func TestWritesLandInOrderAcrossBufferGrowth(t *testing.T) {
	dev, c := transmitting(t, &Server{})
	want := make([]byte, testSize)
	copy(want, pattern(4096))
	var off uint64
	// Growing sizes force the payload buffer to be remapped, twice past its first size.
	for i, n := range []int{512, 4096, 100 << 10, 300 << 10, 1000} {
		p := bytes.Repeat([]byte{byte(i + 1)}, n)
		copy(want[off:], p)
		c.request(cmdWrite, uint64(i), off, uint32(n), p)
		if errno, _ := c.reply(uint64(i), 0); errno != 0 {
			t.Fatalf("write %d: error %d", i, errno)
		}
		off += uint64(n)
	}
	c.readBack(99, 0, want[:off])

	got, calls := dev.snapshot()
	if !bytes.Equal(got, want) {
		t.Error("device bytes differ from the writes")
	}
	for i, call := range calls {
		if !call.aligned {
			t.Errorf("call %d %+v: buffer not page aligned", i, call)
		}
	}
}

func TestServeReturnsWhenContextEndsWithClientsConnected(t *testing.T) {
	dev := newMemDevice(testSize)
	srv := start(t, &Server{Size: testSize, Device: dev})

	// One client mid-way through a WRITE's payload, one mid-handshake:
	// both leave the server blocked in a read that only closing ends.
	busy := dial(t, srv.sock)
	busy.greet(flagFixedNewstyle | flagNoZeroes)
	busy.goExport(testSize)
	busy.readBack(1, 0, make([]byte, 4096))
	busy.request(cmdWrite, 2, 0, 8192, make([]byte, 4096))
	idle := dial(t, srv.sock)
	idle.read(18)

	srv.cancel()
	if err := srv.wait(t); err != nil {
		t.Fatalf("Serve: %v", err)
	}
	busy.closed()
	idle.closed()
	if g := serverGoroutines(t); len(g) != 0 {
		t.Fatalf("%d goroutines still running server code after Serve returned:\n%s", len(g), g)
	}
}

func TestServeWaitsForConnectionsWhenTheListenerCloses(t *testing.T) {
	srv := start(t, &Server{Size: testSize, Device: newMemDevice(testSize)})
	c := dial(t, srv.sock)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.goExport(testSize)

	srv.l.Close()
	select {
	case err := <-srv.done:
		t.Fatalf("Serve returned %v with a client still connected", err)
	case <-time.After(100 * time.Millisecond):
	}
	c.request(cmdFlush, 1, 0, 0, nil) // the connection outlives the listener
	if errno, _ := c.reply(1, 0); errno != 0 {
		t.Fatalf("flush: error %d", errno)
	}
	c.request(cmdDisc, 2, 0, 0, nil)
	if err := srv.wait(t); err != nil {
		t.Fatalf("Serve: %v", err)
	}
	if g := serverGoroutines(t); len(g) != 0 {
		t.Fatalf("%d goroutines still running server code after Serve returned:\n%s", len(g), g)
	}
}

func TestShortDeviceReadIsEIO(t *testing.T) {
	// The export claims more than the device holds, so ReadAt comes up
	// short with io.EOF, which must not pass for a full read.
	dev := newMemDevice(4096)
	c := dial(t, start(t, &Server{Size: testSize, Device: dev}).sock)
	c.greet(flagFixedNewstyle | flagNoZeroes)
	c.goExport(testSize)
	c.request(cmdRead, 1, 0, 8192, nil)
	if errno, _ := c.reply(1, 0); errno != errIO {
		t.Fatalf("error %d, want EIO", errno)
	}
	c.readBack(2, 0, make([]byte, 4096)) // a full read, EOF and all, succeeds
}
