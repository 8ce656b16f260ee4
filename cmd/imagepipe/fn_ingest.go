package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/ingest"
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
	w, err := natsrt.NewWorker(ctx, js, natsrt.Binding{
		Stream: events.StreamS3Events, Durable: "ingest", FilterSubject: events.SubjectS3Events,
		Concurrency: 4, AckWait: 30 * time.Second, MaxAttempts: 5,
		Backoff: []time.Duration{time.Second, 5 * time.Second, 30 * time.Second, time.Minute},
	}, func(ctx context.Context, data []byte, _ natsrt.Delivery) ([]events.Message, error) {
		return h.Handle(ctx, data)
	}, log)
	if err != nil {
		return nil, err
	}
	// An accepted import outlives the control service, which a first
	// signal or a drain stops: the worker's Run waits for it, and its job
	// context (a stop, a second signal) aborts it.
	importCtx, abortImports := context.WithCancel(context.WithoutCancel(ctx))
	if err := serveIngestControl(ctx, importCtx, js.Conn(), h, log); err != nil {
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
		lease, err := openReconcileLease(ctx, js, every, s.Streams.Replicas)
		if err != nil {
			return nil, err
		}
		go h.RunReconcile(ctx, every, lease)
	}
	return w, nil
}

// ingestControlService is the micro service name of ingest's control
// endpoints; `nats micro info imagepipe-intake` lists them.
const ingestControlService = "imagepipe-intake"

// serveIngestControl answers re-convert, import and reconcile requests
// until ctx ends. A micro endpoint rather than a bare queue subscription:
// it is one anyway (queue group "imagepipe-ingest", so exactly one replica
// answers each request), and it adds discovery, PING and STATS, where the
// intake counters are published, with no code of ours.
func serveIngestControl(ctx, importCtx context.Context, nc *nats.Conn, h *ingest.Handler, log *slog.Logger) error {
	host, _ := os.Hostname()
	svc, err := micro.AddService(nc, micro.Config{
		Name:        ingestControlService,
		Version:     "1.0.0", // of this request API, not of the binary
		Description: "imagepipe ingest: re-convert, import and reconcile requests",
		Metadata:    map[string]string{"imagepipe_version": version, "host": host},
		QueueGroup:  "imagepipe-ingest",
		StatsHandler: func(*micro.Endpoint) any {
			return h.Stats()
		},
		ErrorHandler: func(_ micro.Service, err *micro.NATSError) {
			log.Warn("ingest control service error", "subject", err.Subject, "err", err.Description)
		},
	})
	if err != nil {
		return fmt.Errorf("start ingest control service: %w", err)
	}
	endpoints := []struct {
		name, subject string
		handle        func(ctx context.Context, data []byte) (any, error)
	}{
		{"reconvert", events.SubjectReconvert, func(ctx context.Context, data []byte) (any, error) {
			var req events.ReconvertRequest
			if err := decodeRequest(data, &req); err != nil {
				return nil, err
			}
			rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			id, err := h.Reconvert(rctx, req)
			return events.ReconvertReply{JobID: id}, err
		}},
		{"import", events.SubjectImport, func(_ context.Context, data []byte) (any, error) {
			var req events.ImportRequest
			if err := decodeRequest(data, &req); err != nil {
				return nil, err
			}
			return h.Import(importCtx, req)
		}},
		{"reconcile", events.SubjectReconcile, func(ctx context.Context, data []byte) (any, error) {
			var req events.ReconcileRequest
			if err := decodeRequest(data, &req); err != nil {
				return nil, err
			}
			return h.HandleReconcile(ctx, req)
		}},
	}
	for _, ep := range endpoints {
		handler := micro.HandlerFunc(func(req micro.Request) {
			// ctx, not a per-request one: a reconcile is worth finishing
			// though its asker gave up waiting (and an import goes on
			// after its reply, under importCtx).
			reply, err := ep.handle(ctx, req.Data())
			respond(req, reply, err, log.With("endpoint", ep.name))
		})
		if err := svc.AddEndpoint(ep.name, handler, micro.WithEndpointSubject(ep.subject)); err != nil {
			_ = svc.Stop()
			return fmt.Errorf("start ingest control endpoint %s: %w", ep.name, err)
		}
	}
	go func() {
		<-ctx.Done()
		_ = svc.Stop()
	}()
	return nil
}

type errorReply struct {
	Error string `json:"error"`
}

func decodeRequest(data []byte, v any) error {
	if len(data) == 0 {
		data = []byte("{}")
	}
	if err := json.Unmarshal(data, v); err != nil {
		return &ingest.RequestError{Msg: fmt.Sprintf("the request is not valid JSON: %v", err)}
	}
	return nil
}

// respond replies {"error": ...} with micro's error headers on failure, so
// plain `nats req` users and micro clients both see it.
func respond(req micro.Request, reply any, err error, log *slog.Logger) {
	if err == nil {
		if rerr := req.RespondJSON(reply); rerr != nil {
			log.Warn("reply not sent", "err", rerr)
		}
		return
	}
	code := "500"
	if ingest.IsRequestError(err) {
		code = "400"
	} else {
		log.Warn("request failed", "err", err)
	}
	body, _ := json.Marshal(errorReply{Error: err.Error()})
	if rerr := req.Error(code, err.Error(), body); rerr != nil {
		log.Warn("reply not sent", "err", rerr)
	}
}

// reconcileLeaseBucket holds the one key whose holder runs this period's
// reconcile.
const reconcileLeaseBucket = "imagepipe_reconcile_lease"

// kvLease is the right to run one period's reconcile. Create succeeds only
// when the key does not exist, atomically across replicas, and the
// bucket's TTL (the stream's MaxAge) removes the key a little before the
// next period: whoever creates it first in a period runs, the others skip.
// It needs no clocks to agree and no renewal; should a pass outlast its
// period, a second pass is harmless, since reconcile is idempotent.
type kvLease struct {
	kv     jetstream.KeyValue
	holder []byte
}

func openReconcileLease(ctx context.Context, js jetstream.JetStream, every time.Duration, replicas int) (*kvLease, error) {
	host, _ := os.Hostname()
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      reconcileLeaseBucket,
		Description: "which ingest replica runs the current reconcile period",
		History:     1,
		TTL:         every * 9 / 10,
		Storage:     jetstream.FileStorage,
		Replicas:    max(replicas, 1),
	})
	if err != nil {
		return nil, fmt.Errorf("create kv %s: %w", reconcileLeaseBucket, err)
	}
	return &kvLease{kv: kv, holder: fmt.Appendf(nil, "%s/%d", host, os.Getpid())}, nil
}

func (l *kvLease) Acquire(ctx context.Context) (bool, error) {
	_, err := l.kv.Create(ctx, "reconcile", l.holder)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, jetstream.ErrKeyExists):
		return false, nil
	}
	return false, fmt.Errorf("reconcile lease: %w", err)
}
