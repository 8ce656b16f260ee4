package main

import (
	"context"
	"log/slog"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/convert"
	"github.com/imagepipe/imagepipe/internal/dedup"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
	"github.com/imagepipe/imagepipe/internal/scratch"
	"github.com/imagepipe/imagepipe/internal/status"
)

func startConvert(ctx context.Context, js jetstream.JetStream, st *status.Store, s settings, log *slog.Logger) (*natsrt.Worker, error) {
	store, err := objstore.New(s.S3)
	if err != nil {
		return nil, err
	}
	// Replicas starting together on a fresh cluster race to create the
	// bucket, and the loser's create can time out: try again.
	var dd *dedup.Store
	if err := natsrt.WaitJetStream(ctx, js.Conn(), log, "open the de-duplication bucket", func(ctx context.Context) error {
		dd, err = dedup.Open(ctx, js, s.Convert.Dedup.MaxAge.Duration(), dedup.WithReplicas(s.Streams.Replicas))
		return err
	}); err != nil {
		return nil, err
	}
	qemu := qemuimg.New(log)
	qemu.DirectIO = scratch.Supported(s.Convert.Scratch())
	log.Info("scratch", "dir", s.Convert.Scratch(), "direct_io", qemu.DirectIO)
	h := convert.New(s.Convert, store, qemu, st, dd, log)
	h.Sweep(ctx)
	binding := s.Convert.Binding()
	w, err := natsrt.NewWorker(ctx, js, binding, natsrt.Typed(events.TypeConvertJob,
		func(ctx context.Context, job events.ConvertJob, d natsrt.Delivery) ([]events.Message, error) {
			return h.Handle(ctx, job, d.Attempt, d.MaxAttempts)
		}), log)
	if err != nil {
		return nil, err
	}
	// A job whose replica died on every delivery has no attempt left to
	// report it: the advisory JetStream sends then does.
	err = natsrt.WatchExhausted(ctx, js, binding, natsrt.TypedExhausted(events.TypeConvertJob, h.Exhausted, log), log)
	return w, err
}
