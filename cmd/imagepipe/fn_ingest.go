package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/ingest"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/status"
)

func startIngest(ctx context.Context, js jetstream.JetStream, st *status.Store, s settings, log *slog.Logger) (*natsrt.Worker, error) {
	// Ingest owns the door, so it makes sure the door exists: buckets and
	// the bucket notification, both idempotent.
	if err := provisionBuckets(ctx, s); err != nil {
		return nil, err
	}
	h := ingest.New(s.Ingest, st, log)
	return natsrt.NewWorker(ctx, js, natsrt.Binding{
		Stream: events.StreamS3Events, Durable: "ingest", FilterSubject: events.SubjectS3Events,
		Concurrency: 4, AckWait: 30 * time.Second, MaxAttempts: 5,
		Backoff: []time.Duration{time.Second, 5 * time.Second, 30 * time.Second, time.Minute},
	}, func(ctx context.Context, data []byte, _ natsrt.Delivery) ([]events.Message, error) {
		return h.Handle(ctx, data)
	}, log)
}
