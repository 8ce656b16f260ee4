// Package freeport picks loopback TCP ports for servers that must get
// the same port back when they are restarted.
//
// A port taken from the kernel (listening on port 0) comes from its
// ephemeral range, the range it also hands every outgoing connection and
// every other process listening on port 0. Let such a port go while its
// server restarts and another test's server, or a connection, can take it
// meanwhile: the restart then fails, and the cluster's other nodes keep
// dialling whatever answers there. Pick chooses below that range, where
// the kernel hands out nothing.
package freeport

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
)

const (
	// low keeps clear of the well-known ports servers default to (NATS
	// 4222, 6222 and 8222, MinIO 9000 and 9001).
	low = 10000
	// ephemeralLow is where the ephemeral range starts when the kernel
	// does not say: Linux's default (macOS and Windows start at 49152).
	ephemeralLow = 32768
	tries        = 200
)

// given holds the ports this process has handed out: a server not yet
// started, or down for a restart, does not hold its port, and must not
// find it given to another.
var given = struct {
	sync.Mutex
	ports map[int]bool
}{ports: make(map[int]bool)}

// Pick returns a loopback port nothing listens on now, below the
// kernel's ephemeral range.
func Pick() (int, error) {
	high := ephemeralStart()
	if high-low < 1000 {
		// A machine whose ephemeral range covers nearly every port leaves
		// nothing to choose from: take the kernel's pick.
		return kernelPick()
	}
	for range tries {
		p := low + rand.IntN(high-low)
		if !claim(p) {
			continue
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			continue
		}
		l.Close()
		return p, nil
	}
	return 0, fmt.Errorf("find a free port: none free in %d tries between %d and %d", tries, low, high)
}

// claim marks p given, or says it already was.
func claim(p int) bool {
	given.Lock()
	defer given.Unlock()
	if given.ports[p] {
		return false
	}
	given.ports[p] = true
	return true
}

// Addr is Pick as a loopback host:port.
func Addr() (string, error) {
	p, err := Pick()
	if err != nil {
		return "", err
	}
	return "127.0.0.1:" + strconv.Itoa(p), nil
}

// ephemeralStart is the first port of the kernel's ephemeral range, read
// once: it does not change under a running process.
var ephemeralStart = sync.OnceValue(func() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return ephemeralLow
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return ephemeralLow
	}
	n, err := strconv.Atoi(f[0])
	if err != nil {
		return ephemeralLow
	}
	return min(n, ephemeralLow)
})

func kernelPick() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	a, ok := l.Addr().(*net.TCPAddr)
	if !ok {
		return 0, errors.New("find a free port: not a TCP address")
	}
	return a.Port, nil
}
