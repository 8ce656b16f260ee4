// Command imagepipe converts VM disk images uploaded to S3 into raw or qcow2
// images. One binary holds every function and the command-line tools; see
// `imagepipe help`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "0.1.0-dev"

const usage = `imagepipe converts VM disk images uploaded to S3 into raw or qcow2 images.

Usage:
  imagepipe dev [--data DIR]        run the whole system on this machine
  imagepipe setup                   create or update streams, buckets and notification
  imagepipe ingest                  run the ingest function
  imagepipe convert                 run the convert function
  imagepipe notify                  run the notify function
  imagepipe status BUCKET/KEY       show an image's current state (--json)
  imagepipe watch                   follow every image's state live
  imagepipe ls                      list recent jobs (--state failed, --json)
  imagepipe upload FILE [BUCKET/KEY] upload an image and follow its conversion
  imagepipe inspect FILE            judge a local image as convert would (--json)
  imagepipe ctl VERB                status, stats, pause, resume, drain, stop or
                                    cancel every running replica (--function, --instance)
  imagepipe reconvert BUCKET/KEY    queue a new conversion of an upload (--format qcow2)
  imagepipe reconcile               queue uploads whose notification was lost (--prefix P)
  imagepipe import URL [BUCKET/KEY] fetch a URL into the input bucket (--sha256 HEX)
  imagepipe dedup prune             remove old de-duplication records (--older-than 90d)
  imagepipe version                 print the version

Functions are configured by IMAGEPIPE_* environment variables; see README.md.
Exit codes: 0 success, 1 failure, 2 usage error.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run dispatches a subcommand and returns the process exit code.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
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

	log := newLogger(stderr)
	cmd, rest := args[0], args[1:]
	var err error
	switch cmd {
	case "version", "--version":
		fmt.Fprintln(stdout, "imagepipe", version)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
	default:
		c, ok := commands[cmd]
		if !ok {
			fmt.Fprintf(stderr, "imagepipe: unknown command %q\n\n%s", cmd, usage)
			return 2
		}
		err = c(ctx, jobCtx, cmdEnv{args: rest, stdout: stdout, stderr: stderr, log: log})
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, new(usageError)):
		fmt.Fprintln(stderr, "imagepipe:", err)
		return 2
	default:
		fmt.Fprintln(stderr, "imagepipe:", err)
		return 1
	}
}

// cmdEnv is what a command gets besides its contexts.
type cmdEnv struct {
	args           []string
	stdout, stderr io.Writer
	log            *slog.Logger
}

// command runs one subcommand. ctx is cancelled by the first signal (drain),
// jobCtx by the second (abort).
type command func(ctx, jobCtx context.Context, e cmdEnv) error

// commands maps each subcommand to its implementation, one file each.
var commands = map[string]command{
	"dev":     func(ctx, jobCtx context.Context, e cmdEnv) error { return runDev(ctx, jobCtx, e.args, e.stdout, e.log) },
	"setup":   func(ctx, _ context.Context, e cmdEnv) error { return runSetup(ctx, e.args, e.stdout, e.log) },
	"ingest":  func(ctx, jobCtx context.Context, e cmdEnv) error { return runFunction(ctx, jobCtx, "ingest", e.log) },
	"convert": func(ctx, jobCtx context.Context, e cmdEnv) error { return runFunction(ctx, jobCtx, "convert", e.log) },
	"notify":  func(ctx, jobCtx context.Context, e cmdEnv) error { return runFunction(ctx, jobCtx, "notify", e.log) },
	"status":  func(ctx, _ context.Context, e cmdEnv) error { return runStatus(ctx, e.args, e.stdout) },
	"watch":   func(ctx, _ context.Context, e cmdEnv) error { return runWatch(ctx, e.args, e.stdout) },
	"ls":      func(ctx, _ context.Context, e cmdEnv) error { return runLs(ctx, e.args, e.stdout) },
	"upload":  func(ctx, _ context.Context, e cmdEnv) error { return runUpload(ctx, e.args, e.stdout, e.stderr) },
	"inspect": func(ctx, _ context.Context, e cmdEnv) error { return runInspect(ctx, e.args, e.stdout) },
	"ctl":     func(ctx, _ context.Context, e cmdEnv) error { return runCtl(ctx, e.args, e.stdout) },

	// Intake: an ingest replica answers reconvert, reconcile and import over
	// NATS; dedup works on its key-value bucket directly.
	"reconvert": func(ctx, _ context.Context, e cmdEnv) error { return runReconvert(ctx, e.args, e.stdout) },
	"reconcile": func(ctx, _ context.Context, e cmdEnv) error { return runReconcile(ctx, e.args, e.stdout) },
	"import":    func(ctx, _ context.Context, e cmdEnv) error { return runImport(ctx, e.args, e.stdout) },
	"dedup":     func(ctx, _ context.Context, e cmdEnv) error { return runDedup(ctx, e.args, e.stdout) },
}

type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func newLogger(w io.Writer) *slog.Logger {
	level := slog.LevelInfo
	if err := level.UnmarshalText([]byte(os.Getenv("IMAGEPIPE_LOG_LEVEL"))); err != nil {
		level = slog.LevelInfo
	}
	opts := &slog.HandlerOptions{Level: level}
	if os.Getenv("IMAGEPIPE_LOG_FORMAT") == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
