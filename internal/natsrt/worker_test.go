package natsrt_test

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/natstest"
)

func startJetStream(t *testing.T) jetstream.JetStream {
	t.Helper()
	_, js := natstest.Start(t)
	for _, sc := range []jetstream.StreamConfig{
		{Name: "WORK", Subjects: []string{"work.>"}, Retention: jetstream.WorkQueuePolicy},
		{Name: "OUT", Subjects: []string{"out.>"}, Duplicates: time.Minute},
	} {
		if _, err := js.CreateStream(context.Background(), sc); err != nil {
			t.Fatal(err)
		}
	}
	return js
}

type run struct {
	cancel context.CancelFunc
	done   chan struct{}
}

func startWorker(t *testing.T, js jetstream.JetStream, b natsrt.Binding, h natsrt.Handler) *run {
	t.Helper()
	b.Stream, b.Durable, b.FilterSubject = "WORK", "w", "work.>"
	w, err := natsrt.NewWorker(context.Background(), js, b, h, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &run{cancel: cancel, done: make(chan struct{})}
	go func() { _ = w.Run(ctx, context.Background()); close(r.done) }()
	t.Cleanup(func() { cancel(); <-r.done })
	return r
}

func publish(t *testing.T, js jetstream.JetStream, data string) {
	t.Helper()
	if _, err := js.Publish(context.Background(), "work.a", []byte(data)); err != nil {
		t.Fatal(err)
	}
}

func streamMsgs(t *testing.T, js jetstream.JetStream, name string) uint64 {
	t.Helper()
	s, err := js.Stream(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestWorkerAcksAndPublishesWithDeduplicationIDs(t *testing.T) {
	js := startJetStream(t)
	ev, _ := events.New("same-id", "t", "/test", "k", time.Now(), map[string]int{"n": 1})
	startWorker(t, js, natsrt.Binding{}, func(context.Context, []byte, natsrt.Delivery) ([]events.Message, error) {
		return []events.Message{{Subject: "out.a", Event: ev}}, nil
	})
	publish(t, js, "1")
	publish(t, js, "2")
	eventually(t, "both messages acked", func() bool { return streamMsgs(t, js, "WORK") == 0 })
	if got := streamMsgs(t, js, "OUT"); got != 1 {
		t.Errorf("OUT holds %d events; the same event id twice must be stored once", got)
	}
}

func TestWorkerTerminatesPermanentFailuresWithoutRetry(t *testing.T) {
	js := startJetStream(t)
	var calls atomic.Int32
	startWorker(t, js, natsrt.Binding{MaxAttempts: 5, Backoff: []time.Duration{10 * time.Millisecond}}, func(context.Context, []byte, natsrt.Delivery) ([]events.Message, error) {
		calls.Add(1)
		return nil, failure.Permanent(events.PhaseInspect, errors.New("hostile"), "")
	})
	publish(t, js, "x")
	eventually(t, "message terminated", func() bool { return streamMsgs(t, js, "WORK") == 0 })
	time.Sleep(300 * time.Millisecond)
	if got := calls.Load(); got != 1 {
		t.Errorf("handler ran %d times for a permanent failure, want 1", got)
	}
}

func TestWorkerRetriesTransientFailuresUpToMaxAttempts(t *testing.T) {
	js := startJetStream(t)
	var mu sync.Mutex
	var seen []natsrt.Delivery
	startWorker(t, js, natsrt.Binding{MaxAttempts: 3, Backoff: []time.Duration{20 * time.Millisecond}}, func(_ context.Context, _ []byte, d natsrt.Delivery) ([]events.Message, error) {
		mu.Lock()
		seen = append(seen, d)
		mu.Unlock()
		return nil, failure.Retryable(events.PhaseDownload, errors.New("s3 down"), "")
	})
	publish(t, js, "x")
	eventually(t, "message given up", func() bool { return streamMsgs(t, js, "WORK") == 0 })
	time.Sleep(300 * time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 3 {
		t.Fatalf("handler ran %d times, want 3", len(seen))
	}
	for i, d := range seen {
		if d.Attempt != i+1 || d.MaxAttempts != 3 {
			t.Errorf("delivery %d = %+v", i, d)
		}
		wantRetry := i < 2
		if got := d.WillRetry(errors.New("transient")); got != wantRetry {
			t.Errorf("delivery %d WillRetry = %v, want %v", i, got, wantRetry)
		}
	}
}

func TestWorkerKeepsLongJobsAliveBeyondAckWait(t *testing.T) {
	js := startJetStream(t)
	var calls atomic.Int32
	startWorker(t, js, natsrt.Binding{AckWait: 600 * time.Millisecond, Concurrency: 2}, func(context.Context, []byte, natsrt.Delivery) ([]events.Message, error) {
		calls.Add(1)
		time.Sleep(2 * time.Second)
		return nil, nil
	})
	publish(t, js, "slow")
	eventually(t, "slow job acked", func() bool { return streamMsgs(t, js, "WORK") == 0 })
	if got := calls.Load(); got != 1 {
		t.Errorf("a job running past its ack wait was delivered %d times, want 1", got)
	}
}

func TestWorkerDrainsInFlightJobOnShutdown(t *testing.T) {
	js := startJetStream(t)
	started := make(chan struct{})
	var finished atomic.Bool
	r := startWorker(t, js, natsrt.Binding{}, func(context.Context, []byte, natsrt.Delivery) ([]events.Message, error) {
		close(started)
		time.Sleep(500 * time.Millisecond)
		finished.Store(true)
		return nil, nil
	})
	publish(t, js, "x")
	<-started
	r.cancel()
	<-r.done
	if !finished.Load() {
		t.Fatal("Run returned before the in-flight job finished")
	}
	if got := streamMsgs(t, js, "WORK"); got != 0 {
		t.Errorf("drained job left %d messages unacked", got)
	}
}
