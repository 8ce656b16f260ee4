package main

import (
	"context"
	"fmt"
	"log/slog"

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
		return startIngest(ctx, js, st, s, log)
	case "convert":
		return startConvert(ctx, js, st, s, log)
	case "notify":
		return startNotify(ctx, js, s, log)
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
