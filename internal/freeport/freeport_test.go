package freeport

import (
	"net"
	"strconv"
	"testing"
)

func TestPickedPortsAreFreeAndBelowTheKernelsOwn(t *testing.T) {
	// Hold many of the kernel's own picks at once: none may be a port
	// Pick chooses from.
	start := ephemeralStart()
	var held []net.Listener
	defer func() {
		for _, l := range held {
			l.Close()
		}
	}()
	for range 200 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, l)
		if p := l.Addr().(*net.TCPAddr).Port; p >= low && p < start {
			t.Fatalf("the kernel handed out port %d, inside the range Pick chooses from [%d, %d)", p, low, start)
		}
	}
	for range 50 {
		p, err := Pick()
		if err != nil {
			t.Fatal(err)
		}
		if p < low || p >= start {
			t.Fatalf("picked %d, outside [%d, %d)", p, low, start)
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			t.Fatalf("picked port %d cannot be listened on: %v", p, err)
		}
		l.Close()
	}
}

func TestNoPortIsPickedTwice(t *testing.T) {
	// Ports are let go as soon as they are picked, as a test does until
	// its server starts: a second pick must still not return one of them.
	seen := make(map[int]bool)
	for range 2000 {
		p, err := Pick()
		if err != nil {
			t.Fatal(err)
		}
		if seen[p] {
			t.Fatalf("port %d picked twice", p)
		}
		seen[p] = true
	}
}
