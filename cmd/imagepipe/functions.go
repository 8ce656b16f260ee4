package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/caarlos0/env/v11"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/convert"
	"github.com/imagepipe/imagepipe/functions/ingest"
	"github.com/imagepipe/imagepipe/functions/notify"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
	"github.com/imagepipe/imagepipe/internal/setup"
	"github.com/imagepipe/imagepipe/internal/status"
)

// settings is what every function reads from the environment.
type settings struct {
	NATS    natsrt.Config
	S3      objstore.Config
	Streams setup.StreamConfig
	Buckets setup.BucketConfig
	Ingest  ingest.Config
	Convert convert.Config
	Notify  notify.Config
}

func loadSettings() (settings, error) {
	var s settings
	if err := env.Parse(&s); err != nil {
		return s, fmt.Errorf("configuration: %w", err)
	}
	return s, nil
}

// runFunction runs one function as a long-lived service.
func runFunction(ctx, jobCtx context.Context, name string, log *slog.Logger) error {
	s, err := loadSettings()
	if err != nil {
		return err
	}
	log = log.With("function", name)
	nc, err := natsrt.Connect(ctx, s.NATS, "imagepipe-"+name, log)
	if err != nil {
		return err
	}
	defer nc.Close()
	w, err := startFunction(ctx, nc, name, s, log)
	if err != nil {
		return err
	}
	log.Info("started", "version", version)
	err = w.Run(ctx, jobCtx)
	log.Info("stopped")
	return err
}

// startFunction provisions the streams and binds the named function's
// handler to its consumer.
func startFunction(ctx context.Context, nc *nats.Conn, name string, s settings, log *slog.Logger) (*natsrt.Worker, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	if err := setup.Streams(ctx, js, s.Streams); err != nil {
		return nil, err
	}
	kv, err := setup.StatusKV(ctx, js, s.Streams.Replicas)
	if err != nil {
		return nil, err
	}
	st := status.New(kv, nc)

	switch name {
	case "ingest":
		// Ingest owns the door, so it makes sure the door exists: buckets
		// and the bucket notification, both idempotent.
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

	case "convert":
		store, err := objstore.New(s.S3)
		if err != nil {
			return nil, err
		}
		h := convert.New(s.Convert, store, qemuimg.New(log), st, log)
		return natsrt.NewWorker(ctx, js, natsrt.Binding{
			Stream: events.StreamJobs, Durable: "convert", FilterSubject: events.SubjectConvertJob,
			Concurrency: s.Convert.MaxConcurrentJobs, AckWait: s.Convert.AckWait,
			MaxAttempts: s.Convert.MaxAttempts, Backoff: s.Convert.Backoff(),
		}, func(ctx context.Context, data []byte, d natsrt.Delivery) ([]events.Message, error) {
			var job events.ConvertJob
			if err := decode(data, events.TypeConvertJob, &job); err != nil {
				return nil, err
			}
			return h.Handle(ctx, job, d.Attempt, d.MaxAttempts)
		}, log)

	case "notify":
		ledger, err := notify.NewKVLedger(ctx, js)
		if err != nil {
			return nil, err
		}
		h, err := notify.NewHandler(s.Notify, ledger, log, &http.Client{})
		if err != nil {
			return nil, err
		}
		return natsrt.NewWorker(ctx, js, natsrt.Binding{
			Stream: events.StreamResults, Durable: "notify", FilterSubject: events.SubjectResults,
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
	return nil, fmt.Errorf("unknown function %q", name)
}

func decode(data []byte, typ string, v any) error {
	ev, err := events.Decode(data)
	if err == nil {
		err = ev.DecodeData(typ, v)
	}
	if err != nil {
		return failure.Permanent(events.PhaseIntake, err, "")
	}
	return nil
}

func provisionBuckets(ctx context.Context, s settings) error {
	store, err := objstore.New(s.S3)
	if err != nil {
		return err
	}
	if err := setup.Buckets(ctx, store.Client(), s.Ingest.InputBucket, s.Convert.OutputBucket); err != nil {
		return err
	}
	if s.Buckets.NotifyTarget == "" {
		return nil
	}
	return setup.Notification(ctx, store.Client(), s.Ingest.InputBucket, s.Buckets.NotifyTarget)
}
