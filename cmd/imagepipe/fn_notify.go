package main

import (
	"context"
	"log/slog"
	"net/http"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/notify"
	"github.com/imagepipe/imagepipe/internal/metrics"
	"github.com/imagepipe/imagepipe/internal/natsrt"
)

// orphanBound is the ingest setting notify reads: its watchdog counts the
// uploads whose job was lost by the bound reconcile heals them by, so that
// it names what the next reconcile pass will queue again. Its tag is
// ingest.Config's.
type orphanBound struct {
	StaleAfter time.Duration `env:"IMAGEPIPE_RECONCILE_STALE_AFTER" doc:"how long a status of QUEUED … UPLOADING may stand still, its job gone from the JOBS stream, before reconcile queues the job again (default: max(2 × IMAGEPIPE_ACK_WAIT, longest back-off step) + 1m, 21m with the defaults)"`
}

func startNotify(ctx context.Context, js jetstream.JetStream, s settings, m *metrics.Metrics, log *slog.Logger) (*natsrt.Worker, error) {
	var ledger *notify.KVLedger
	if err := natsrt.WaitJetStream(ctx, js.Conn(), log, "open the notification ledger", func(ctx context.Context) error {
		var err error
		ledger, err = notify.NewKVLedger(ctx, js, s.Streams.Replicas)
		return err
	}); err != nil {
		return nil, err
	}
	h, err := notify.NewHandler(s.Notify, ledger, log, &http.Client{}, notify.WithDeliveryRecorder(m.RecordDelivery))
	if err != nil {
		return nil, err
	}
	// The watchdog lives as long as the function: it stops with ctx, and
	// only one replica's watchdog is active at a time (a KV lease). It
	// counts the uploads whose job was lost by reconcile's own bound, so
	// that it names what the next reconcile pass will heal.
	var wd *notify.Watchdog
	if err := natsrt.WaitJetStream(ctx, js.Conn(), log, "start the stall watchdog", func(ctx context.Context) error {
		var err error
		wd, err = notify.NewWatchdog(ctx, js, s.Notify.StallAfter, log, notify.WithLeaseReplicas(s.Streams.Replicas),
			notify.WithCheckInterval(s.Notify.StallCheck), notify.WithOrphans(reconcileStaleAfter(s), m.OrphanRecorder()))
		return err
	}); err != nil {
		return nil, err
	}
	go wd.Run(ctx)
	// notify publishes nothing: it only delivers.
	return natsrt.NewWorker(ctx, js, s.Notify.Binding(), natsrt.AnyEvent(events.PhasePublish,
		func(ctx context.Context, ev events.Event, _ natsrt.Delivery) ([]events.Message, error) {
			return nil, h.Handle(ctx, ev)
		}), log)
}
