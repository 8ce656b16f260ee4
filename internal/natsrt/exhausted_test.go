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

// workQueue is the WORK stream's consumer "w", which allows 2 deliveries
// (twice MaxAttempts) a second apart.
func workQueue(ctx context.Context, t *testing.T, js jetstream.JetStream) (natsrt.Binding, jetstream.Consumer) {
	t.Helper()
	b := natsrt.Binding{Stream: "WORK", Durable: "w", FilterSubject: "work.>", MaxAttempts: 1, AckWait: time.Second}
	if _, err := natsrt.NewWorker(ctx, js, b, nil, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	cons, err := js.Consumer(ctx, "WORK", "w")
	if err != nil {
		t.Fatal(err)
	}
	return b, cons
}

// dieHolding has two workers take the next message in turn and die holding
// it: neither acks, naks or terms. The server gives up on it when it next
// tries to deliver it, which the last fetch makes it do.
func dieHolding(t *testing.T, cons jetstream.Consumer, want string) {
	t.Helper()
	for i := 1; i <= 2; i++ {
		m, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
		if err != nil || string(m.Data()) != want {
			t.Fatalf("delivery %d: %v, %v; want %q", i, m, err, want)
		}
		time.Sleep(1500 * time.Millisecond) // past AckWait: the worker is gone
	}
	if m, err := cons.Next(jetstream.FetchMaxWait(time.Second)); err == nil {
		t.Fatalf("a third delivery of %q; MaxDeliver is 2", m.Data())
	}
}

// reports keeps what WatchExhausted reports, making one event of each.
type reports struct {
	mu         sync.Mutex
	data       []string
	deliveries int
}

func (r *reports) handle(_ context.Context, data []byte, n int) []events.Message {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.data, r.deliveries = append(r.data, string(data)), n
	ev, _ := events.New("exhausted-"+string(data), "t", "/test", string(data), time.Now(), map[string]int{"deliveries": n})
	return []events.Message{{Subject: "out.failed", Event: ev}}
}

func (r *reports) check(t *testing.T, want string) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.data) != 1 || r.data[0] != want || r.deliveries != 2 {
		t.Errorf("reported %q after %d deliveries, want %s once after 2", r.data, r.deliveries, want)
	}
}

func TestMessageWhoseWorkersAllDiedIsReportedAndLeavesTheQueue(t *testing.T) {
	js := startJetStream(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	b, cons := workQueue(ctx, t, js)
	var r reports
	if err := natsrt.WatchExhausted(ctx, js, b, r.handle, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	publish(t, js, "job-1")
	dieHolding(t, cons, "job-1")

	eventually(t, "the report to be published and the message removed", func() bool {
		return streamMsgs(t, js, "OUT") == 1 && streamMsgs(t, js, "WORK") == 0
	})
	r.check(t, "job-1")
}

func TestMessageGivenUpOnWhileNobodyListenedIsReportedOnStart(t *testing.T) {
	js := startJetStream(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	b, cons := workQueue(ctx, t, js)
	publish(t, js, "settled")
	publish(t, js, "job-lost")
	// The first message is settled; the second is given up on while no
	// replica listens for the advisory (or the one that heard it died
	// before it could report).
	m, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second))
	if err != nil || string(m.Data()) != "settled" {
		t.Fatalf("first delivery %v, %v", m, err)
	}
	if err := m.DoubleAck(ctx); err != nil {
		t.Fatal(err)
	}
	dieHolding(t, cons, "job-lost")
	// Queued behind it and never delivered: not given up on.
	publish(t, js, "waiting")

	var r reports
	if err := natsrt.WatchExhausted(ctx, js, b, r.handle, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the report to be published and the message removed", func() bool {
		return streamMsgs(t, js, "OUT") == 1 && streamMsgs(t, js, "WORK") == 1
	})
	r.check(t, "job-lost")
	if m, err := cons.Next(jetstream.FetchMaxWait(5 * time.Second)); err != nil || string(m.Data()) != "waiting" {
		t.Errorf("the message queued behind: %v, %v; want it delivered", m, err)
	}
}
