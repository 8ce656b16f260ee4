// Command cpuhog runs a command while every core is kept busy: the load
// under which `go tool task stress` runs the end-to-end and cluster tests,
// so that a test which passes only on an idle machine is found here rather
// than in CI.
//
//	cpuhog go test -race ./cmd/imagepipe
//
// The hog lives exactly as long as the command and exits with its status.
// It runs the command itself rather than being started in the background
// and killed afterwards, because Task's shell has no process id in `$!`:
// a hog started that way outlived the run and kept loading the machine.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"sync"
	"syscall"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

// run keeps every core busy while args runs, and returns its exit code:
// 2 when there is no command or it cannot start.
func run(args []string) int {
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "usage: cpuhog COMMAND [ARG...]")
		return 2
	}
	ctx, stop := context.WithCancel(context.Background())
	var spinners sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		spinners.Go(func() { spin(ctx) })
	}
	defer func() {
		stop()
		spinners.Wait()
	}()

	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "cpuhog: %v\n", err)
		return 2
	}
	// An interrupt reaches the command, which decides when to end; the hog
	// ends with it.
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, os.Interrupt, syscall.SIGTERM)
	defer func() {
		signal.Stop(signals)
		close(signals)
	}()
	go func() {
		for s := range signals {
			_ = cmd.Process.Signal(s)
		}
	}()
	err := cmd.Wait()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &exit) && exit.ExitCode() >= 0:
		return exit.ExitCode()
	default:
		fmt.Fprintf(os.Stderr, "cpuhog: %v\n", err)
		return 1
	}
}

// spin burns a core until ctx ends; the work is kept live so the compiler
// cannot drop it.
func spin(ctx context.Context) {
	x := uint64(1)
	for {
		for range 1 << 20 {
			x = x*6364136223846793005 + 1442695040888963407
		}
		if x == 0 {
			println(x)
		}
		select {
		case <-ctx.Done():
			return
		default:
		}
	}
}
