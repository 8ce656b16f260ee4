package notify_test

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/notify"
	"github.com/imagepipe/imagepipe/internal/natstest"
)

// orphanCounts records what the watchdog reports for the metric.
type orphanCounts struct {
	mu   sync.Mutex
	last int
	ok   bool
	seen bool
}

func (o *orphanCounts) record(n int, ok bool) {
	o.mu.Lock()
	o.last, o.ok, o.seen = n, ok, true
	o.mu.Unlock()
}

func (o *orphanCounts) await(t *testing.T, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		o.mu.Lock()
		n, ok, seen := o.last, o.ok, o.seen
		o.mu.Unlock()
		if seen && ok && n == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the watchdog counts %d uploads with no job (known %v), want %d", n, ok, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// An upload whose job message was lost leaves the queue empty: nothing
// there says anything is wrong. The watchdog counts it from its status and
// alerts, naming it, then reports the recovery once it is healed.
func TestWatchdogAlertsOnAnUploadWhoseJobTheQueueLost(t *testing.T) {
	q := newQueueFixture(t)
	ctx := context.Background()
	kv := natstest.StatusBucket(t, q.js)
	const staleAfter = 2 * time.Second
	old := time.Now().Add(-time.Hour).UTC()
	// Lost: QUEUED long ago, and JOBS holds nothing.
	natstest.PutStatus(t, kv, events.Status{Bucket: "uploads", Key: "disks/lost.vhdx", JobID: "job-lost", State: events.StateQueued, Attempt: 1, UpdatedAt: old})
	// Not lost: finished long ago; and a conversion whose status moves.
	natstest.PutStatus(t, kv, events.Status{Bucket: "uploads", Key: "disks/done.vhdx", JobID: "job-done", State: events.StateReady, UpdatedAt: old})
	live := events.Status{Bucket: "uploads", Key: "disks/live.vhdx", JobID: "job-live", State: events.StateConverting, Attempt: 1}
	hbCtx, stopHeartbeat := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		for pct := 1.0; hbCtx.Err() == nil; pct = min(pct+1, 99) {
			live.Percent, live.UpdatedAt = pct, time.Now().UTC()
			natstest.PutStatus(t, kv, live)
			select {
			case <-hbCtx.Done():
			case <-time.After(200 * time.Millisecond):
			}
		}
	})
	t.Cleanup(func() { stopHeartbeat(); wg.Wait() })

	counts := &orphanCounts{}
	runWatchdog(t, q.js, time.Second, notify.WithOrphans(staleAfter, counts.record))

	counts.await(t, 1)
	got := q.waitForAlerts(t, 1, 10*time.Second)
	if len(got) != 1 || got[0].Type != events.TypeStalled {
		t.Fatalf("alerts %v, want one stall alert with the queue empty", got)
	}
	var a notify.QueueAlert
	if err := got[0].DecodeData(events.TypeStalled, &a); err != nil {
		t.Fatal(err)
	}
	if a.QueueDepth != 0 || a.Orphaned != 1 || !slices.Equal(a.OrphanedKeys, []string{"uploads/disks/lost.vhdx"}) || !a.LastActivity.Equal(old) {
		t.Errorf("alert %+v; want depth 0, the one lost upload named, stalled since it last moved (%s)", a, old)
	}
	// Ticks go on; the same stall is not announced again.
	time.Sleep(time.Second)
	if got := q.alerts(t); len(got) != 1 {
		t.Fatalf("%d alerts while the same upload stayed lost, want 1", len(got))
	}

	// Healed, as reconcile's new job and its conversion would.
	natstest.PutStatus(t, kv, events.Status{Bucket: "uploads", Key: "disks/lost.vhdx", JobID: "job-lost", State: events.StateReady, Attempt: 1, UpdatedAt: time.Now().UTC()})
	counts.await(t, 0)
	got = q.waitForAlerts(t, 2, 10*time.Second)
	if len(got) != 2 || got[1].Type != events.TypeQueueRecover {
		t.Fatalf("alerts %v, want the stall and then its recovery", got)
	}
}

// Without WithOrphans the watchdog looks at the queue only, as before: an
// empty queue is never stalled.
func TestWatchdogWithoutOrphanCountingIgnoresStatuses(t *testing.T) {
	q := newQueueFixture(t)
	kv := natstest.StatusBucket(t, q.js)
	natstest.PutStatus(t, kv, events.Status{Bucket: "uploads", Key: "disks/lost.vhdx", JobID: "job-lost", State: events.StateQueued, UpdatedAt: time.Now().Add(-time.Hour).UTC()})
	runWatchdog(t, q.js, time.Second)
	if got := q.waitForAlerts(t, 1, 3*time.Second); len(got) != 0 {
		t.Fatalf("alerts %v with an empty queue and no orphan counting", got)
	}
}

// A queue already reported stalled whose job is then lost has not moved:
// the watchdog reports no recovery, only a second stall alert that names
// the upload, and then stays quiet.
func TestWatchdogReportsAJobLostFromAStalledQueueWithoutARecovery(t *testing.T) {
	q := newQueueFixture(t)
	ctx := context.Background()
	kv := natstest.StatusBucket(t, q.js)
	// QUEUED is written just before the job is published, as ingest does.
	natstest.PutStatus(t, kv, events.Status{Bucket: "uploads", Key: "disks/paused.vhdx", JobID: "job-paused", State: events.StateQueued, Attempt: 1, UpdatedAt: time.Now().UTC()})
	job := mustEvent(t, "job-paused", events.TypeConvertJob, "disks/paused.vhdx", events.ConvertJob{JobID: "job-paused", Bucket: "uploads", Key: "disks/paused.vhdx"})
	ack, err := q.js.Publish(ctx, events.SubjectConvertJob, mustJSON(t, job))
	if err != nil {
		t.Fatal(err)
	}

	counts := &orphanCounts{}
	runWatchdog(t, q.js, time.Second, notify.WithOrphans(500*time.Millisecond, counts.record))

	got := q.waitForAlerts(t, 1, 10*time.Second)
	var first notify.QueueAlert
	if len(got) != 1 || got[0].DecodeData(events.TypeStalled, &first) != nil || first.QueueDepth != 1 || first.Orphaned != 0 {
		t.Fatalf("alerts %v, want one stall alert for the job waiting", got)
	}

	jobs, err := q.js.Stream(ctx, events.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	if err := jobs.DeleteMsg(ctx, ack.Sequence); err != nil {
		t.Fatal(err)
	}
	counts.await(t, 1)
	got = q.waitForAlerts(t, 2, 10*time.Second)
	time.Sleep(time.Second) // ticks go on; nothing more is announced
	got = q.alerts(t)
	if len(got) != 2 || got[1].Type != events.TypeStalled {
		t.Fatalf("alerts %v, want the first stall alert and one naming the lost upload", got)
	}
	var lost notify.QueueAlert
	if err := got[1].DecodeData(events.TypeStalled, &lost); err != nil {
		t.Fatal(err)
	}
	if lost.QueueDepth != 0 || lost.Orphaned != 1 || !slices.Equal(lost.OrphanedKeys, []string{"uploads/disks/paused.vhdx"}) || !lost.LastActivity.Before(first.LastActivity) {
		t.Errorf("second alert %+v; want depth 0, the lost upload named, stalled since before the first alert's %s", lost, first.LastActivity)
	}
}
