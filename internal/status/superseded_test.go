package status_test

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/status"
)

// A delivery of an older job, still at work when a newer version's job
// finished, can no longer take the record: the newer READY stays, once.
func TestAnOlderJobAtWorkNeverReplacesARecordANewerJobFinished(t *testing.T) {
	s, kv := newStore(t)
	ctx := context.Background()
	steps := []step{
		{st("old", 1, events.StateConverting, 50), true},
		{st("new", 0, events.StateQueued, 0), true},
		{st("old", 1, events.StateUploading, 10), true}, // the newer job has not started: still taken, and handed back
		{st("new", 1, events.StateDownloading, 0), true},
		{st("new", 1, events.StateReady, 100), true},
		{st("old", 1, events.StateUploading, 60), false},
		{st("old", 1, events.StateQueued, 0), false}, // its retry
		{st("old", 1, events.StateFailed, 0), false},
		{st("new", 0, events.StateReady, 100), false}, // a hand-back of the newer READY
		// What starts or refuses a newer job still replaces it.
		{st("newest", 0, events.StateQueued, 0), true},
		{st("newest", 1, events.StateReady, 100), true},
		{st("import", 0, events.StateUploaded, 0), true},
	}
	var want []events.State
	for i, sp := range steps {
		err := s.Set(ctx, sp.st)
		switch {
		case sp.written && err != nil:
			t.Fatalf("step %d (%s job %s): %v", i, sp.st.State, sp.st.JobID, err)
		case !sp.written && !errors.Is(err, status.ErrNotForward):
			t.Fatalf("step %d (%s job %s): err = %v, want ErrNotForward", i, sp.st.State, sp.st.JobID, err)
		}
		if sp.written {
			want = append(want, sp.st.State)
		}
	}
	refused := st("refused", 1, events.StateFailed, 0)
	refused.Phase = events.PhaseIntake
	if err := s.Set(ctx, st("ready", 1, events.StateReady, 100)); err != nil {
		t.Fatal(err)
	}
	if err := s.Set(ctx, refused); err != nil {
		t.Fatalf("intake's refusal of a newer upload over a finished record: %v", err)
	}
	want = append(want, events.StateReady, events.StateFailed)
	if got := history(t, kv, "uploads", "disks/a.vhdx"); !slices.Equal(got, want) {
		t.Fatalf("history %v, want %v", got, want)
	}
}
