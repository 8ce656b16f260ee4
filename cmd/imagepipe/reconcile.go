package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/imagepipe/imagepipe/events"
)

// runReconcile asks an ingest replica to list the input bucket and queue
// every upload no notification brought in, and prints what it did.
func runReconcile(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("reconcile", flag.ContinueOnError)
	prefix := fs.String("prefix", "", "reconcile only keys under this prefix")
	timeout := fs.Duration("timeout", 10*time.Minute, "how long to wait for the pass to finish (it goes on if this runs out)")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "Usage: imagepipe reconcile [--prefix P]\n\nQueues every eligible object in the input bucket that has no status record,\nas if its lost notification had arrived.")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args, stdout); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return usageError{"reconcile takes no arguments"}
	}
	var res events.ReconcileResult
	if err := ctlRequest(ctx, events.SubjectReconcile, events.ReconcileRequest{Prefix: *prefix}, &res, *timeout); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "listed %d, queued %d, refused %d\n", res.Listed, res.Queued, res.Refused)
	if len(res.Keys) > 0 {
		fmt.Fprintf(stdout, "  %s\n", strings.Join(res.Keys, "\n  "))
	}
	return nil
}
