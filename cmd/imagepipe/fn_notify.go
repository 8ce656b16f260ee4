package main

import (
	"context"
	"log/slog"
	"net/http"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/notify"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/natsrt"
)

func startNotify(ctx context.Context, js jetstream.JetStream, s settings, recordDelivery func(channel, outcome string), log *slog.Logger) (*natsrt.Worker, error) {
	ledger, err := notify.NewKVLedger(ctx, js, s.Streams.Replicas)
	if err != nil {
		return nil, err
	}
	h, err := notify.NewHandler(s.Notify, ledger, log, &http.Client{}, notify.WithDeliveryRecorder(recordDelivery))
	if err != nil {
		return nil, err
	}
	// The watchdog lives as long as the function: it stops with ctx, and
	// only one replica's watchdog is active at a time (a KV lease).
	wd, err := notify.NewWatchdog(ctx, js, s.Notify.StallAfter, log, notify.WithLeaseReplicas(s.Streams.Replicas))
	if err != nil {
		return nil, err
	}
	go wd.Run(ctx)
	return natsrt.NewWorker(ctx, js, natsrt.Binding{
		// Results and queue alerts: everything the RESULTS stream holds.
		Stream: events.StreamResults, Durable: "notify",
		Concurrency: 4, AckWait: time.Minute,
		// A channel that is down for long keeps its messages in the
		// stream: about a day and a half of retries before giving up.
		MaxAttempts: 200,
		Backoff:     []time.Duration{5 * time.Second, 30 * time.Second, 2 * time.Minute, 10 * time.Minute},
	}, func(ctx context.Context, data []byte, _ natsrt.Delivery) ([]events.Message, error) {
		ev, err := events.Decode(data)
		if err != nil {
			return nil, failure.Permanent(events.PhasePublish, err, "")
		}
		return nil, h.Handle(ctx, ev)
	}, log)
}
