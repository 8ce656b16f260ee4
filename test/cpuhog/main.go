// Command cpuhog keeps every core busy until it is stopped: the load under
// which `go tool task stress` runs the end-to-end and cluster tests, so
// that a test which passes only on an idle machine is found here rather
// than in CI.
package main

import (
	"os"
	"os/signal"
	"runtime"
	"syscall"
)

func main() {
	for range runtime.GOMAXPROCS(0) {
		go spin()
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, os.Interrupt, syscall.SIGTERM)
	<-stop
}

// spin burns a core; the work is kept live so the compiler cannot drop it.
func spin() {
	x := uint64(1)
	for {
		x = x*6364136223846793005 + 1442695040888963407
		if x == 0 {
			println(x)
		}
	}
}
