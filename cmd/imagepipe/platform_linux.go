//go:build linux && !portable

package main

import (
	"os"
	"os/signal"
	"syscall"
)

// requireLinux lets what (a function, or dev) run: this is Linux.
func requireLinux(what string) error { return nil }

// allocatedBytes is how much disk fi's file takes, holes excluded.
func allocatedBytes(fi os.FileInfo) int64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512
	}
	return fi.Size()
}

// notifyStatsSignal relays SIGUSR1, on which a running function logs its
// statistics, to c.
func notifyStatsSignal(c chan<- os.Signal) { signal.Notify(c, syscall.SIGUSR1) }
