package convert

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"testing"

	"github.com/imagepipe/imagepipe/internal/qemuimg"
)

// Building a handler touches nothing: the scratch of a dead job is still
// there until the runtime starts the handler's sweep.
func TestNewDoesNoIOAndSweepReclaimsADeadJobsScratch(t *testing.T) {
	root := t.TempDir()
	live, dead := liveAndDeadJobDirs(t, root)
	var aborts int
	store := &fakeStore{AbortFn: func(context.Context, string, string, string) error { aborts++; return nil }}
	h := New(Config{OutputBucket: "images", OutputFormat: "raw", ScratchDir: root}, store, qemuimg.New(nil), &fakeReporter{}, nil, slog.New(slog.DiscardHandler))
	if _, err := os.Stat(dead); err != nil {
		t.Fatalf("New removed a dead job's scratch: %v", err)
	}
	h.Sweep(context.Background())
	if _, err := os.Stat(dead); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Sweep left the dead job's scratch: %v", err)
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("Sweep removed the live job's scratch: %v", err)
	}
	if aborts != 0 {
		t.Errorf("Sweep aborted %d uploads, and no job noted any", aborts)
	}
}
