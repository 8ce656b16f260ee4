package natsrt_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/natsrt"
)

// runWorker starts a worker on WORK and returns it with the channel Run's
// result arrives on.
func runWorker(t *testing.T, js jetstream.JetStream, b natsrt.Binding, h natsrt.Handler) (*natsrt.Worker, <-chan error) {
	t.Helper()
	b.Stream, b.Durable, b.FilterSubject = "WORK", "w", "work.>"
	w, err := natsrt.NewWorker(context.Background(), js, b, h, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	finished := make(chan struct{})
	go func() {
		done <- w.Run(ctx, context.Background())
		close(finished)
	}()
	t.Cleanup(func() {
		cancel()
		w.Stop()
		select {
		case <-finished:
		case <-time.After(10 * time.Second):
			t.Error("worker did not stop")
		}
	})
	eventually(t, "worker running", func() bool { return w.State() == events.WorkerRunning })
	return w, done
}

// describeKey reads "bucket/key" messages.
func describeKey(data []byte) events.JobRef {
	b, k, _ := strings.Cut(string(data), "/")
	return events.JobRef{ID: "job-" + k, Bucket: b, Key: k}
}

type recorder struct {
	mu       sync.Mutex
	started  []events.JobInfo
	finished []natsrt.Finished
}

func (r *recorder) Started(j events.JobInfo) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.started = append(r.started, j)
}

func (r *recorder) Finished(f natsrt.Finished) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.finished = append(r.finished, f)
}

func (r *recorder) outcomes() []natsrt.Outcome {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []natsrt.Outcome
	for _, f := range r.finished {
		out = append(out, f.Outcome)
	}
	return out
}

var _ natsrt.Observer = (*recorder)(nil)

func TestPauseInterruptsAWaitingFetchAndResumeContinues(t *testing.T) {
	js := startJetStream(t)
	var calls atomic.Int32
	w, _ := runWorker(t, js, natsrt.Binding{Concurrency: 2}, func(context.Context, []byte, natsrt.Delivery) ([]events.Message, error) {
		calls.Add(1)
		return nil, nil
	})
	// Both slots are now waiting in a pull; a pause must end those pulls,
	// not let them take the next message.
	w.Pause()
	if got := w.State(); got != events.WorkerPaused {
		t.Errorf("state = %s, want paused", got)
	}
	publish(t, js, "while paused")
	time.Sleep(700 * time.Millisecond)
	if got := calls.Load(); got != 0 {
		t.Fatalf("a paused worker handled %d messages", got)
	}
	w.Resume()
	eventually(t, "message handled after resume", func() bool { return calls.Load() == 1 })
}

func TestCancelStopsTheJobOfAnInputForGood(t *testing.T) {
	js := startJetStream(t)
	var calls atomic.Int32
	var cause atomic.Value
	rec := &recorder{}
	ev, _ := events.New("cancel-ev", "t", "/test", "k", time.Now(), map[string]string{"outcome": "cancelled"})
	w, _ := runWorker(t, js, natsrt.Binding{MaxAttempts: 3, Backoff: []time.Duration{10 * time.Millisecond}, Describe: describeKey},
		func(ctx context.Context, _ []byte, _ natsrt.Delivery) ([]events.Message, error) {
			calls.Add(1)
			<-ctx.Done()
			cause.Store(context.Cause(ctx))
			// Handlers classify a cancelled context as retryable; the
			// runtime must still never retry an operator's cancel.
			return []events.Message{{Subject: "out.a", Event: ev}}, failure.Retryable(events.PhaseConvert, ctx.Err(), "")
		})
	w.Observe(rec)
	publish(t, js, "uploads/disks/a.vhdx")
	eventually(t, "job in flight", func() bool { return len(w.Jobs()) == 1 })
	if got := w.Jobs()[0]; got.Bucket != "uploads" || got.Key != "disks/a.vhdx" || got.ID != "job-disks/a.vhdx" || got.Attempt != 1 {
		t.Errorf("in-flight job = %+v", got)
	}
	if got := w.Cancel("uploads", "disks/other.vhdx"); len(got) != 0 {
		t.Errorf("cancelling another key cancelled %v", got)
	}
	if got := w.Cancel("uploads", "disks/a.vhdx"); len(got) != 1 {
		t.Fatalf("Cancel found %d jobs, want 1", len(got))
	}
	eventually(t, "cancelled job settled", func() bool { return streamMsgs(t, js, "WORK") == 0 })
	time.Sleep(300 * time.Millisecond)
	if got := calls.Load(); got != 1 {
		t.Errorf("handler ran %d times; a cancelled job must not be retried", got)
	}
	if c, _ := cause.Load().(error); !errors.Is(c, failure.ErrCancelled) {
		t.Errorf("handler saw cause %v, want failure.ErrCancelled", c)
	}
	if got := streamMsgs(t, js, "OUT"); got != 1 {
		t.Errorf("OUT holds %d events; the cancelled job's result must be published", got)
	}
	if got := rec.outcomes(); len(got) != 1 || got[0] != natsrt.OutcomeCancelled {
		t.Errorf("outcomes = %v, want [cancelled]", got)
	}
	if got := w.Counts(); got.Cancelled != 1 || got.Handled != 1 {
		t.Errorf("counts = %+v", got)
	}
}

func TestStopHandsInFlightJobsToAnotherReplicaAtOnce(t *testing.T) {
	js := startJetStream(t)
	ev, _ := events.New("aborted-ev", "t", "/test", "k", time.Now(), map[string]string{"outcome": "failed"})
	// An hour of back-off: only a nak without delay gets the job to the
	// second replica within the test. A single attempt: a stop must not
	// use it up.
	b := natsrt.Binding{MaxAttempts: 1, Backoff: []time.Duration{time.Hour}}
	first, done := runWorker(t, js, b, func(ctx context.Context, _ []byte, _ natsrt.Delivery) ([]events.Message, error) {
		<-ctx.Done()
		return []events.Message{{Subject: "out.a", Event: ev}}, failure.Retryable(events.PhaseConvert, ctx.Err(), "")
	})
	rec := &recorder{}
	first.Observe(rec)
	publish(t, js, "x")
	eventually(t, "job in flight", func() bool { return first.InFlight() == 1 })
	first.Stop()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run after Stop = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after Stop")
	}
	if got := first.State(); got != events.WorkerStopped {
		t.Errorf("state = %s, want stopped", got)
	}
	if got := rec.outcomes(); len(got) != 1 || got[0] != natsrt.OutcomeAborted {
		t.Errorf("outcomes = %v, want [aborted]", got)
	}

	var attempt atomic.Int32
	runWorker(t, js, b, func(_ context.Context, _ []byte, d natsrt.Delivery) ([]events.Message, error) {
		attempt.Store(int32(d.Attempt))
		return nil, nil
	})
	eventually(t, "second replica took the job", func() bool { return attempt.Load() == 2 })
	eventually(t, "job acked", func() bool { return streamMsgs(t, js, "WORK") == 0 })
	if got := streamMsgs(t, js, "OUT"); got != 0 {
		t.Errorf("OUT holds %d events; an aborted attempt reports nothing", got)
	}
}

func TestDrainFinishesInFlightJobsThenRunReturns(t *testing.T) {
	js := startJetStream(t)
	release := make(chan struct{})
	var calls atomic.Int32
	w, done := runWorker(t, js, natsrt.Binding{Concurrency: 2}, func(context.Context, []byte, natsrt.Delivery) ([]events.Message, error) {
		calls.Add(1)
		<-release
		return nil, nil
	})
	publish(t, js, "a")
	eventually(t, "job in flight", func() bool { return w.InFlight() == 1 })
	w.Drain()
	if got := w.State(); got != events.WorkerDraining {
		t.Errorf("state = %s, want draining", got)
	}
	publish(t, js, "b")
	time.Sleep(300 * time.Millisecond)
	close(release)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run after Drain = %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after Drain")
	}
	if got := calls.Load(); got != 1 {
		t.Errorf("a draining worker started %d jobs, want only the one in flight", got)
	}
	if got := streamMsgs(t, js, "WORK"); got != 1 {
		t.Errorf("WORK holds %d messages, want the one left for another replica", got)
	}
	if got := w.Counts(); got.Acked != 1 {
		t.Errorf("counts = %+v, want the in-flight job acked", got)
	}
}

func TestRunWaitsForWorkAddedWithAlsoAndStopCutsItShort(t *testing.T) {
	for _, how := range []string{"drain", "stop"} {
		t.Run(how, func(t *testing.T) {
			js := startJetStream(t)
			w, err := natsrt.NewWorker(context.Background(), js, natsrt.Binding{Stream: "WORK", Durable: "w", FilterSubject: "work.>"},
				func(context.Context, []byte, natsrt.Delivery) ([]events.Message, error) { return nil, nil }, slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatal(err)
			}
			release := make(chan struct{})
			var cut atomic.Bool
			w.Also(func(jobCtx context.Context) {
				select {
				case <-release:
				case <-jobCtx.Done():
					cut.Store(true)
				}
			})
			ctx, drain := context.WithCancel(context.Background())
			defer drain()
			jobCtx, stop := context.WithCancel(context.Background())
			defer stop()
			done := make(chan error, 1)
			go func() { done <- w.Run(ctx, jobCtx) }()
			eventually(t, "worker running", func() bool { return w.State() == events.WorkerRunning })

			drain()
			select {
			case <-done:
				t.Fatal("Run returned while the work added with Also was still going")
			case <-time.After(500 * time.Millisecond):
			}
			if how == "stop" {
				stop()
			} else {
				close(release)
			}
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Run did not return once the work added with Also ended")
			}
			if cut.Load() != (how == "stop") {
				t.Errorf("work cut short = %v after a %s", cut.Load(), how)
			}
		})
	}
}
