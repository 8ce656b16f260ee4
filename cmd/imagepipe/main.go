// Command imagepipe converts VM disk images uploaded to S3 into raw or qcow2
// images. One binary holds every function and the command-line tools; see
// `imagepipe help`.
package main

import (
	"context"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "0.1.0-dev"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run runs the command args name and returns the process exit code.
func run(args []string, stdout, stderr io.Writer) int {
	// The first signal drains: stop fetching, finish in-flight jobs. A
	// second one aborts the jobs, which JetStream then redelivers.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	jobCtx, abort := context.WithCancel(context.Background())
	defer abort()
	go func() {
		<-ctx.Done()
		stop()
		again := make(chan os.Signal, 1)
		signal.Notify(again, os.Interrupt, syscall.SIGTERM)
		defer signal.Stop(again)
		select {
		case <-again:
			abort()
		case <-jobCtx.Done():
		}
	}()

	return execute(ctx, &cliEnv{stdout: stdout, stderr: stderr, log: newLogger(stderr), jobCtx: jobCtx}, args)
}

// newLogger logs at IMAGEPIPE_LOG_LEVEL in IMAGEPIPE_LOG_FORMAT. A bad value
// falls back to info and text here; the functions and `config check` refuse
// it before anything starts, naming the variable.
func newLogger(w io.Writer) *slog.Logger {
	level, _ := parseLogLevel(os.Getenv("IMAGEPIPE_LOG_LEVEL"))
	opts := &slog.HandlerOptions{Level: level}
	if json, _ := parseLogFormat(os.Getenv("IMAGEPIPE_LOG_FORMAT")); json {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
