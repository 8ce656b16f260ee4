package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/dedup"
	"github.com/imagepipe/imagepipe/internal/natsrt"
)

func newDedupCmd(e *cliEnv) *cobra.Command {
	c := &cobra.Command{
		Use:   "dedup prune",
		Short: "remove old de-duplication records (--older-than 90d)",
		Long: `Manages the content de-duplication records convert keeps, so that the same
content uploaded again is not converted again.`,
	}
	var olderThan dedup.Age
	prune := &cobra.Command{
		Use:   "prune",
		Short: "remove de-duplication records older than an age",
		Long: `Removes de-duplication records older than --older-than (default
IMAGEPIPE_DEDUP_MAX_AGE): content uploaded again after that is converted
again. The records' bucket must exist: imagepipe setup creates it.`,
		Example: "  imagepipe dedup prune\n  imagepipe dedup prune --older-than 30d",
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var age *dedup.Age
			if cmd.Flags().Changed("older-than") {
				age = &olderThan
			}
			return runDedupPrune(cmd.Context(), age, e.stdout)
		},
	}
	prune.Flags().TextVar(&olderThan, "older-than", dedup.Age(0), "remove records made longer ago than this: days (90d) or a Go duration (36h) (default IMAGEPIPE_DEDUP_MAX_AGE)")
	c.AddCommand(prune)
	needsSubcommand(c)
	return c
}

// runDedupPrune removes old records. It opens the bucket as it is: a tool
// that created it would hide a NATS that imagepipe was never set up on.
func runDedupPrune(ctx context.Context, age *dedup.Age, stdout io.Writer) error {
	var s settings
	err := loadCommandSettings(&s.NATS, &s.Convert.Dedup)
	if err != nil {
		return err
	}
	olderThan := s.Convert.Dedup.MaxAge
	if age != nil {
		olderThan = *age
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
	store, err := dedup.Existing(ctx, js)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return fmt.Errorf("the key-value bucket %s does not exist on this NATS: run imagepipe setup first (or check IMAGEPIPE_NATS_URL)", events.DedupBucket)
	}
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
