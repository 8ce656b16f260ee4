package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/internal/dedup"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/setup"
)

const setupUsage = `Usage: imagepipe setup

Creates or updates, without losing data, everything imagepipe needs: the
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

// runSetup provisions the streams and buckets and prints what it changed.
func runSetup(ctx context.Context, args []string, stdout io.Writer, log *slog.Logger) error {
	fs := flag.NewFlagSet("setup", flag.ContinueOnError)
	fs.Usage = func() { fmt.Fprint(fs.Output(), setupUsage) }
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return usageError{"setup takes no arguments"}
	}
	s, err := loadSettings()
	if err != nil {
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
// themselves, with the functions' own code and settings, so that both
// always agree on what the bucket should be.
func provisionFunctionKV(ctx context.Context, js jetstream.JetStream, s settings) (setup.Report, error) {
	type owned struct {
		bucket string
		open   func(context.Context) error
	}
	buckets := []owned{{dedup.Bucket, func(ctx context.Context) error {
		_, err := dedup.Open(ctx, js, s.Convert.Dedup.MaxAge.Duration(), dedup.WithReplicas(s.Streams.Replicas))
		return err
	}}}
	if s.Ingest.ReconcileEvery > 0 {
		buckets = append(buckets, owned{reconcileLeaseBucket, func(ctx context.Context) error {
			_, err := openReconcileLease(ctx, js, s.Ingest.ReconcileEvery, s.Streams.Replicas)
			return err
		}})
	}
	var r setup.Report
	for _, b := range buckets {
		c, err := setup.OwnedKV(ctx, js, b.bucket, b.open)
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
