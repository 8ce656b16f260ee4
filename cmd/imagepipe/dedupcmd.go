package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/internal/dedup"
	"github.com/imagepipe/imagepipe/internal/natsrt"
)

// runDedup manages the content de-duplication records.
func runDedup(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) == 0 || args[0] != "prune" {
		return usageError{"usage: imagepipe dedup prune [--older-than 90d]"}
	}
	s, err := loadSettings()
	if err != nil {
		return err
	}
	fs := flag.NewFlagSet("dedup prune", flag.ContinueOnError)
	olderThan := s.Convert.Dedup.MaxAge
	fs.TextVar(&olderThan, "older-than", s.Convert.Dedup.MaxAge, "remove records made longer ago than this: days (90d) or a Go duration (36h)")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "Usage: imagepipe dedup prune [--older-than 90d]\n\nRemoves de-duplication records older than the age (default IMAGEPIPE_DEDUP_MAX_AGE):\ncontent uploaded again after that is converted again.")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args[1:], stdout); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return usageError{"dedup prune takes no arguments"}
	}
	nc, err := natsrt.Connect(ctx, s.NATS, "cli", slog.New(slog.DiscardHandler))
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	store, err := dedup.Open(ctx, js, s.Convert.Dedup.MaxAge.Duration(), dedup.WithReplicas(s.Streams.Replicas))
	if err != nil {
		return err
	}
	n, err := store.Prune(ctx, olderThan.Duration(), time.Now())
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "pruned %d records older than %s\n", n, olderThan)
	return nil
}
