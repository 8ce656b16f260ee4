package status_test

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/natstest"
	"github.com/imagepipe/imagepipe/internal/status"
)

func newStore(t *testing.T) (*status.Store, jetstream.KeyValue) {
	t.Helper()
	_, js := natstest.Start(t)
	kv, err := js.CreateKeyValue(context.Background(), jetstream.KeyValueConfig{Bucket: events.StatusBucket, History: 64})
	if err != nil {
		t.Fatal(err)
	}
	return status.New(kv, nil), kv
}

// history is the sequence of states the key went through, as a KV watcher
// would have seen them.
func history(t *testing.T, kv jetstream.KeyValue, bucket, key string) []events.State {
	t.Helper()
	es, err := kv.History(context.Background(), events.StatusKey(bucket, key))
	if err != nil {
		t.Fatal(err)
	}
	var out []events.State
	for _, e := range es {
		var st struct{ State events.State }
		if err := json.Unmarshal(e.Value(), &st); err != nil {
			t.Fatal(err)
		}
		out = append(out, st.State)
	}
	return out
}

func st(job string, attempt int, state events.State, pct float64) events.Status {
	return events.Status{Bucket: "uploads", Key: "disks/a.vhdx", JobID: job, Attempt: attempt, State: state, Percent: pct}
}

// step is one write and whether the record must take it.
type step struct {
	st      events.Status
	written bool
}

func TestStatusMovesOnlyForwardWithinAJob(t *testing.T) {
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{"the whole flow of one delivery", []step{
			{st("j1", 0, events.StateQueued, 0), true},
			{st("j1", 1, events.StateDownloading, 0), true},
			{st("j1", 1, events.StateDownloading, 60), true},
			{st("j1", 1, events.StateInspecting, 0), true},
			{st("j1", 1, events.StateConverting, 0), true},
			{st("j1", 1, events.StateConverting, 40), true},
			{st("j1", 1, events.StateUploading, 0), true},
			{st("j1", 1, events.StateUploading, 80), true},
			{st("j1", 1, events.StateReady, 100), true},
		}},
		{"a second READY of the same job is dropped", []step{
			{st("j1", 1, events.StateReady, 100), true},
			{st("j1", 2, events.StateReady, 100), false},
			{st("j1", 1, events.StateReady, 100), false},
		}},
		{"a finished job never moves again", []step{
			{st("j1", 1, events.StateFailed, 0), true},
			{st("j1", 2, events.StateQueued, 0), false},
			{st("j1", 2, events.StateDownloading, 0), false},
			{st("j1", 1, events.StateCancelled, 0), false},
		}},
		{"no step back within a delivery", []step{
			{st("j1", 1, events.StateUploading, 0), true},
			{st("j1", 1, events.StateInspecting, 0), false},
			{st("j1", 1, events.StateDownloading, 0), false},
		}},
		{"a retry returns to QUEUED and the next delivery goes on", []step{
			{st("j1", 1, events.StateConverting, 10), true},
			{st("j1", 1, events.StateQueued, 0), true},
			{st("j1", 2, events.StateDownloading, 0), true},
		}},
		{"a later delivery takes over and the earlier one can no longer move it", []step{
			{st("j1", 1, events.StateConverting, 50), true},
			{st("j1", 2, events.StateDownloading, 0), true},
			{st("j1", 1, events.StateUploading, 0), false},
			{st("j1", 1, events.StateReady, 100), false},
			{st("j1", 2, events.StateReady, 100), true},
		}},
		{"an output that streams and an appliance's disks alternate CONVERTING and UPLOADING", []step{
			{st("j1", 1, events.StateConverting, 0), true},
			{st("j1", 1, events.StateUploading, 0), true},
			{st("j1", 1, events.StateConverting, 0), true},
		}},
		{"a new job for the same upload starts a new sequence", []step{
			{st("j1", 1, events.StateReady, 100), true},
			{st("j2", 0, events.StateQueued, 0), true},
			{st("j2", 1, events.StateDownloading, 0), true},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, kv := newStore(t)
			ctx := context.Background()
			var want []events.State
			for i, sp := range tc.steps {
				err := s.Set(ctx, sp.st)
				switch {
				case sp.written && err != nil:
					t.Fatalf("step %d (%s job %s attempt %d): %v", i, sp.st.State, sp.st.JobID, sp.st.Attempt, err)
				case !sp.written && !errors.Is(err, status.ErrNotForward):
					t.Fatalf("step %d (%s job %s attempt %d): err = %v, want ErrNotForward", i, sp.st.State, sp.st.JobID, sp.st.Attempt, err)
				}
				if sp.written {
					want = append(want, sp.st.State)
				}
			}
			if got := history(t, kv, "uploads", "disks/a.vhdx"); !slices.Equal(got, want) {
				t.Fatalf("history %v, want %v", got, want)
			}
		})
	}
}

func TestRacingDeliveriesRecordReadyOnce(t *testing.T) {
	s, kv := newStore(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := s.Set(ctx, st("j1", 1, events.StateUploading, 0)); err != nil {
		t.Fatal(err)
	}
	const racers = 8
	var wg sync.WaitGroup
	errs := make([]error, racers)
	for i := range racers {
		wg.Go(func() { errs[i] = s.Set(ctx, st("j1", 1, events.StateReady, 100)) })
	}
	wg.Wait()
	won := 0
	for _, err := range errs {
		switch {
		case err == nil:
			won++
		case !errors.Is(err, status.ErrNotForward):
			t.Fatalf("racing write: %v", err)
		}
	}
	if won != 1 {
		t.Fatalf("%d of %d racing READY writes took effect, want exactly 1", won, racers)
	}
	want := []events.State{events.StateUploading, events.StateReady}
	if got := history(t, kv, "uploads", "disks/a.vhdx"); !slices.Equal(got, want) {
		t.Fatalf("history %v, want %v", got, want)
	}
}

func TestQueueNeverMovesTheSameJobBack(t *testing.T) {
	s, kv := newStore(t)
	ctx := context.Background()
	if err := s.Queue(ctx, st("j1", 0, "", 0)); err != nil {
		t.Fatal(err)
	}
	if err := s.Set(ctx, st("j1", 1, events.StateReady, 100)); err != nil {
		t.Fatal(err)
	}
	// A repeated notification of the same upload.
	if err := s.Queue(ctx, st("j1", 0, "", 0)); err != nil {
		t.Fatalf("repeated queue: %v, want nil", err)
	}
	// A newer version of it.
	if err := s.Queue(ctx, st("j2", 0, "", 0)); err != nil {
		t.Fatal(err)
	}
	want := []events.State{events.StateQueued, events.StateReady, events.StateQueued}
	if got := history(t, kv, "uploads", "disks/a.vhdx"); !slices.Equal(got, want) {
		t.Fatalf("history %v, want %v", got, want)
	}
	cur, err := s.Get(ctx, "uploads", "disks/a.vhdx")
	if err != nil || cur.JobID != "j2" {
		t.Fatalf("record %+v, %v; want job j2", cur, err)
	}
}
