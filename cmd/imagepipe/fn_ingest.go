package main

import (
	"context"
	"log/slog"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/ingest"
	"github.com/imagepipe/imagepipe/internal/control"
	"github.com/imagepipe/imagepipe/internal/lease"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/status"
)

func startIngest(ctx context.Context, js jetstream.JetStream, st *status.Store, s settings, log *slog.Logger) (*natsrt.Worker, error) {
	// Ingest owns the door, so it makes sure the door exists: buckets and
	// the bucket notification, both idempotent.
	if err := provisionBuckets(ctx, s); err != nil {
		return nil, err
	}
	store, err := objstore.New(s.S3)
	if err != nil {
		return nil, err
	}
	s.Ingest.ReconcileStaleAfter = reconcileStaleAfter(s)
	h := ingest.New(s.Ingest, ingest.Deps{
		Status:  st,
		Storage: store,
		Publish: func(ctx context.Context, msgs ...events.Message) error { return natsrt.Publish(ctx, js, msgs...) },
		Jobs:    jobQueue{js},
	}, log)
	w, err := natsrt.NewWorker(ctx, js, s.Ingest.Binding(), natsrt.Payload(h.Handle), log)
	if err != nil {
		return nil, err
	}
	// An accepted import outlives the control service, which a first
	// signal or a drain stops: the worker's Run waits for it, and its job
	// context (a stop, a second signal) aborts it.
	importCtx, abortImports := context.WithCancel(context.WithoutCancel(ctx))
	if err := control.ServeIntake(ctx, js.Conn(), control.IntakeOptions{
		Intake: h, ImportContext: importCtx, IsRequestError: ingest.IsRequestError, Version: version, Log: log,
	}); err != nil {
		abortImports()
		return nil, err
	}
	w.Also(func(jobCtx context.Context) {
		defer abortImports()
		stop := context.AfterFunc(jobCtx, abortImports)
		defer stop()
		h.WaitImports()
	})
	if every := s.Ingest.ReconcileEvery; every > 0 {
		var l *lease.Lease
		if err := natsrt.WaitJetStream(ctx, js.Conn(), log, "open the reconcile lease", func(ctx context.Context) error {
			l, err = lease.Open(ctx, js, s.Ingest.ReconcileLease(s.Streams.Replicas), ingest.ReconcileLeaseKey, "reconcile", log)
			return err
		}); err != nil {
			return nil, err
		}
		go h.RunReconcile(ctx, every, l)
	}
	return w, nil
}
