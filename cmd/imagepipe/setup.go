package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/imagepipe/imagepipe/internal/dedup"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/setup"
)

const setupLong = `Creates or updates, without losing data, everything imagepipe needs: the
streams S3_EVENTS, JOBS and RESULTS (IMAGEPIPE_STREAM_REPLICAS replicas), the
status, de-duplication and reconcile-lease buckets, the input and output
buckets, the lifecycle rule that expires error reports, and MinIO's bucket
notification. It prints one line per thing
and changes nothing that is already right, so it is safe to run at every
deployment. Consumers are created by each function at start.

It needs a NATS user that may manage streams and S3 credentials that may
create buckets and set their notification and lifecycle; see README.md,
"Running in production".
`

func newSetupCmd(e *cliEnv) *cobra.Command {
	return &cobra.Command{
		Use:   "setup",
		Short: "create or update streams, buckets and the bucket notification",
		Long:  setupLong,
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runSetup(cmd.Context(), e.stdout, e.log)
		},
	}
}

// runSetup provisions the streams and buckets and prints what it changed.
func runSetup(ctx context.Context, stdout io.Writer, log *slog.Logger) error {
	// Everything but notify's settings: setup provisions what ingest and
	// convert use.
	var s settings
	if err := loadCommandSettings(&s.NATS, &s.S3, &s.Streams, &s.Buckets, &s.Ingest, &s.Convert); err != nil {
		return err
	}
	if err := s.checkOutputLayout(); err != nil {
		return err
	}
	nc, err := natsrt.Connect(ctx, s.NATS, "setup", log)
	if err != nil {
		return err
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}

	// Streams first: MinIO only publishes, so S3_EVENTS must exist before
	// the bucket notification points at it.
	report, err := setup.JetStream(ctx, js, s.Streams)
	var more setup.Report
	if err == nil {
		more, err = provisionFunctionKV(ctx, js, s)
		report = append(report, more...)
	}
	if err == nil {
		more, err = provisionObjects(ctx, s)
		report = append(report, more...)
	}
	for _, c := range report {
		fmt.Fprintln(stdout, c)
	}
	if err != nil {
		return err
	}
	if !report.Changed() {
		fmt.Fprintln(stdout, "nothing changed")
	}
	return nil
}

// provisionFunctionKV creates or updates the buckets functions configure
// themselves, from the functions' own settings, so that both always agree
// on what the bucket should be. The functions only create them if missing.
func provisionFunctionKV(ctx context.Context, js jetstream.JetStream, s settings) (setup.Report, error) {
	dd, err := dedup.BucketConfig(s.Convert.Dedup.MaxAge.Duration(), dedup.WithReplicas(s.Streams.Replicas))
	if err != nil {
		return nil, err
	}
	buckets := []jetstream.KeyValueConfig{dd}
	if s.Ingest.ReconcileEvery > 0 {
		buckets = append(buckets, s.Ingest.ReconcileLease(s.Streams.Replicas).KeyValueConfig())
	}
	var r setup.Report
	for _, b := range buckets {
		c, err := setup.ApplyKV(ctx, js, b)
		if err != nil {
			return r, err
		}
		r = append(r, c)
	}
	return r, nil
}

// provisionObjects creates or updates the buckets, their lifecycle rule and
// the bucket notification.
func provisionObjects(ctx context.Context, s settings) (setup.Report, error) {
	store, err := objstore.New(s.S3)
	if err != nil {
		return nil, err
	}
	return setup.ObjectStore(ctx, store.Client(), setup.ObjectConfig{
		InputBucket:  s.Ingest.InputBucket,
		OutputBucket: s.Convert.OutputBucket,
		NotifyTarget: s.Buckets.NotifyTarget,
	})
}

// logReport logs what a provisioning step changed, for `imagepipe dev`.
func logReport(log *slog.Logger, r setup.Report) {
	for _, c := range r {
		if c.Action != setup.Unchanged {
			log.Info("setup: " + c.String())
		}
	}
}
