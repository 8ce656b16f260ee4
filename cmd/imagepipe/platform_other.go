//go:build !linux || portable

package main

import (
	"fmt"
	"os"
	"runtime"
)

// requireLinux refuses to run what (a function, or dev) anywhere but on
// Linux: they confine qemu-img with prlimit, write scratch files with
// O_DIRECT and map holes with SEEK_DATA, and elsewhere would run under
// weaker limits than the documented ones. A Linux build tagged portable,
// which runs other systems' code paths, refuses too.
func requireLinux(what string) error {
	system := runtime.GOOS + "/" + runtime.GOARCH
	if runtime.GOOS == "linux" {
		system += ", built with -tags portable"
	}
	return fmt.Errorf("imagepipe %s runs on Linux only (this is %s); the functions (ingest, convert, notify) and dev need Linux, while upload, inspect, status, watch, ls, ctl, reconvert and import work on every system",
		what, system)
}

// allocatedBytes is fi's size: this build does not count holes.
func allocatedBytes(fi os.FileInfo) int64 { return fi.Size() }

// notifyStatsSignal relays nothing: there is no SIGUSR1 here, and the
// functions that answer it run on Linux only.
func notifyStatsSignal(chan<- os.Signal) {}
