package natsrt_test

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/natsrt"
)

func TestMessageWhoseWorkersAllDiedIsReportedAndLeavesTheQueue(t *testing.T) {
	js := startJetStream(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	b := natsrt.Binding{Stream: "WORK", Durable: "w", FilterSubject: "work.>", MaxAttempts: 1, AckWait: time.Second}
	if _, err := natsrt.NewWorker(ctx, js, b, nil, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var reported []string
	var deliveries int
	err := natsrt.WatchExhausted(ctx, js, b, func(_ context.Context, data []byte, n int) []events.Message {
		mu.Lock()
		defer mu.Unlock()
		reported, deliveries = append(reported, string(data)), n
		ev, _ := events.New("exhausted-"+string(data), "t", "/test", string(data), time.Now(), map[string]int{"deliveries": n})
		return []events.Message{{Subject: "out.failed", Event: ev}}
	}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	publish(t, js, "job-1")

	// Two workers take the message in turn and die holding it: neither
	// acks, naks or terms. The consumer allows 2 deliveries (twice
	// MaxAttempts); the next fetch finds it has none left.
	cons, err := js.Consumer(ctx, "WORK", "w")
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 2; i++ {
		m, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
		if err != nil {
			t.Fatalf("delivery %d: %v", i, err)
		}
		if string(m.Data()) != "job-1" {
			t.Fatalf("delivery %d is %q", i, m.Data())
		}
		time.Sleep(1500 * time.Millisecond) // past AckWait: the worker is gone
	}
	if m, err := cons.Next(jetstream.FetchMaxWait(time.Second)); err == nil {
		t.Fatalf("a third delivery of %q; MaxDeliver is 2", m.Data())
	}

	eventually(t, "the message given up on to be reported", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(reported) > 0
	})
	eventually(t, "the report to be published and the message removed", func() bool {
		return streamMsgs(t, js, "OUT") == 1 && streamMsgs(t, js, "WORK") == 0
	})
	mu.Lock()
	defer mu.Unlock()
	if len(reported) != 1 || reported[0] != "job-1" || deliveries != 2 {
		t.Errorf("reported %q after %d deliveries, want job-1 once after 2", reported, deliveries)
	}
}

func TestMessageGivenUpOnWhileNobodyListenedIsReportedOnStart(t *testing.T) {
	js := startJetStream(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	b := natsrt.Binding{Stream: "WORK", Durable: "w", FilterSubject: "work.>", MaxAttempts: 1, AckWait: time.Second}
	if _, err := natsrt.NewWorker(ctx, js, b, nil, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	publish(t, js, "settled")
	publish(t, js, "job-lost")
	cons, err := js.Consumer(ctx, "WORK", "w")
	if err != nil {
		t.Fatal(err)
	}
	// The first message is settled; the second is delivered twice to
	// workers that die, while no replica listens for the advisory (or the
	// one that heard it died before it could report).
	m, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
	if err != nil || string(m.Data()) != "settled" {
		t.Fatalf("first delivery %v, %v", m, err)
	}
	if err := m.DoubleAck(ctx); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 2; i++ {
		m, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
		if err != nil || string(m.Data()) != "job-lost" {
			t.Fatalf("delivery %d: %v, %v", i, m, err)
		}
		time.Sleep(1500 * time.Millisecond) // past AckWait: the worker is gone
	}
	// The server gives up on a message when it next tries to deliver it.
	if m, err := cons.Next(jetstream.FetchMaxWait(time.Second)); err == nil {
		t.Fatalf("a third delivery of %q; MaxDeliver is 2", m.Data())
	}
	// Queued behind it and never delivered: not given up on.
	publish(t, js, "waiting")

	var mu sync.Mutex
	var reported []string
	var deliveries int
	err = natsrt.WatchExhausted(ctx, js, b, func(_ context.Context, data []byte, n int) []events.Message {
		mu.Lock()
		defer mu.Unlock()
		reported, deliveries = append(reported, string(data)), n
		ev, _ := events.New("exhausted-"+string(data), "t", "/test", string(data), time.Now(), map[string]int{"deliveries": n})
		return []events.Message{{Subject: "out.failed", Event: ev}}
	}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the report to be published and the message removed", func() bool {
		return streamMsgs(t, js, "OUT") == 1 && streamMsgs(t, js, "WORK") == 1
	})
	mu.Lock()
	defer mu.Unlock()
	if len(reported) != 1 || reported[0] != "job-lost" || deliveries != 2 {
		t.Errorf("reported %q after %d deliveries, want job-lost once after 2", reported, deliveries)
	}
	if m, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second)); err != nil || string(m.Data()) != "waiting" {
		t.Errorf("the message queued behind: %v, %v; want it delivered", m, err)
	}
}
