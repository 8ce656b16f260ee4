package main

import (
	"context"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/convert"
	"github.com/imagepipe/imagepipe/internal/dedup"
	"github.com/imagepipe/imagepipe/internal/direct"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
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
	for attempt := 1; ; attempt++ {
		if dd, err = dedup.Open(ctx, js, s.Convert.Dedup.MaxAge.Duration(), dedup.WithReplicas(s.Streams.Replicas)); err == nil || attempt == 5 || ctx.Err() != nil {
			break
		}
		log.Warn("opening the de-duplication bucket failed; retrying", "err", err, "attempt", attempt)
		time.Sleep(time.Duration(attempt) * time.Second)
	}
	if err != nil {
		return nil, err
	}
	qemu := qemuimg.New(log)
	qemu.DirectIO = direct.Supported(s.Convert.Scratch())
	log.Info("scratch", "dir", s.Convert.Scratch(), "direct_io", qemu.DirectIO)
	h := convert.New(s.Convert, store, qemu, st, dd, log)
	binding := natsrt.Binding{
		Stream: events.StreamJobs, Durable: "convert", FilterSubject: events.SubjectConvertJob,
		Concurrency: s.Convert.MaxConcurrentJobs, AckWait: s.Convert.AckWait,
		MaxAttempts: s.Convert.MaxAttempts, Backoff: s.Convert.Backoff(),
		Describe: describeConvertJob,
	}
	w, err := natsrt.NewWorker(ctx, js, binding, func(ctx context.Context, data []byte, d natsrt.Delivery) ([]events.Message, error) {
		var job events.ConvertJob
		if err := decode(data, events.TypeConvertJob, &job); err != nil {
			return nil, err
		}
		return h.Handle(ctx, job, d.Attempt, d.MaxAttempts)
	}, log)
	if err != nil {
		return nil, err
	}
	// A job whose replica died on every delivery has no attempt left to
	// report it: the advisory JetStream sends then does.
	err = natsrt.WatchExhausted(ctx, js, binding, func(ctx context.Context, data []byte, deliveries int) []events.Message {
		var job events.ConvertJob
		if err := decode(data, events.TypeConvertJob, &job); err != nil {
			log.Warn("a job given up on cannot be read; nothing to report", "err", err)
			return nil
		}
		return h.Exhausted(ctx, job, deliveries)
	}, log)
	return w, err
}
