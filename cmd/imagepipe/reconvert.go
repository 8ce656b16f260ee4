package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/imagepipe/imagepipe/events"
)

// runReconvert asks an ingest replica to queue a new conversion of an
// object. The request goes over NATS rather than being done here, so the
// answer follows the running ingest's rules and input bucket, and the
// operator needs no S3 credentials.
func runReconvert(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("reconvert", flag.ContinueOnError)
	format := fs.String("format", "", "output format, raw or qcow2 (default: the converter's IMAGEPIPE_OUTPUT_FORMAT)")
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for an answer")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "Usage: imagepipe reconvert [--format raw|qcow2] BUCKET/KEY\n\nQueues a new conversion of an uploaded object, even if the same content\nwas converted before, and prints the job id.")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, interleaved(fs, args), stdout); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usageError{"reconvert takes one BUCKET/KEY"}
	}
	bucket, key, err := splitObject(fs.Arg(0))
	if err != nil {
		return err
	}
	var reply events.ReconvertReply
	if err := ctlRequest(ctx, events.SubjectReconvert, events.ReconvertRequest{Bucket: bucket, Key: key, Format: *format}, &reply, *timeout); err != nil {
		return err
	}
	fmt.Fprintln(stdout, reply.JobID)
	return nil
}

// ctlRequest sends a JSON request to ingest's control endpoints and decodes
// the reply, turning {"error": ...} into an error of one plain line.
func ctlRequest(ctx context.Context, subject string, req, reply any, timeout time.Duration) error {
	nc, _, err := connectCLI(ctx)
	if err != nil {
		return err
	}
	defer nc.Close()
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	msg, err := nc.RequestWithContext(rctx, subject, body)
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		return fmt.Errorf("no ingest replica answers on %s: is imagepipe ingest (or imagepipe dev) running?", subject)
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("no answer on %s within %s", subject, timeout)
	case err != nil:
		return fmt.Errorf("request on %s: %w", subject, err)
	}
	var e errorReply
	if json.Unmarshal(msg.Data, &e) == nil && e.Error != "" {
		return errors.New(e.Error)
	}
	if err := json.Unmarshal(msg.Data, reply); err != nil {
		return fmt.Errorf("reply on %s: %w", subject, err)
	}
	return nil
}

// parseFlags parses quietly: a bad flag is one line of usage error, and
// only --help prints the usage, to stdout.
func parseFlags(fs *flag.FlagSet, args []string, stdout io.Writer) error {
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	switch {
	case errors.Is(err, flag.ErrHelp):
		fs.SetOutput(stdout)
		fs.Usage()
		return err
	case err != nil:
		return usageError{fmt.Sprintf("%s: %v", fs.Name(), err)}
	}
	return nil
}

// interleaved moves flags after positional arguments to the front, so
// `reconvert uploads/a.vhdx --format qcow2` works as people type it.
func interleaved(fs *flag.FlagSet, args []string) []string {
	var flags, rest []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			rest = append(rest, args[i+1:]...)
			break
		}
		if len(a) < 2 || a[0] != '-' {
			rest = append(rest, a)
			continue
		}
		flags = append(flags, a)
		name := a[1:]
		if name[0] == '-' {
			name = name[1:]
		}
		if _, hasValue := splitFlagValue(name); hasValue {
			continue
		}
		if f := fs.Lookup(name); f != nil && !isBoolFlag(f) && i+1 < len(args) {
			i++
			flags = append(flags, args[i])
		}
	}
	return append(flags, rest...)
}

func splitFlagValue(name string) (string, bool) {
	for i := 0; i < len(name); i++ {
		if name[i] == '=' {
			return name[:i], true
		}
	}
	return name, false
}

func isBoolFlag(f *flag.Flag) bool {
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}
