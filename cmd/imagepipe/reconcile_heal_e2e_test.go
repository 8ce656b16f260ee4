package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/ingest"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/orphan"
	"github.com/imagepipe/imagepipe/internal/setup"
	"github.com/imagepipe/imagepipe/internal/status"
)

func TestUploadWhoseQueuedJobIsLostEndsReadyOnceAfterReconcile(t *testing.T) {
	res, prefix, key, path := healCase(t, "queued", "lost.qcow2", 0x5a)
	want, _ := localRaw(t, path, "qcow2")
	readies := countReady(t, key)

	// Paused, so the job waits in JOBS and the status says QUEUED.
	pauseStackConvert(t)
	upload(t, key, path, false)
	st := awaitState(t, key, events.StateQueued)
	// Lost, as an acknowledged write lost in a crash would be.
	deleteJob(t, st.JobID)
	e2e.stack.workers["convert"].Resume()

	// Nothing is left to run: the status stays QUEUED however long.
	time.Sleep(2 * time.Second)
	if got := statusOf(t, "uploads", key); got.State != events.StateQueued {
		t.Fatalf("status %s with no job in the queue, want QUEUED", got.State)
	}

	reconcileHealsOnce(t, res, readies, prefix, key, st.JobID, want)
}

// reconcileHealsOnce runs reconcile over an upload whose job was lost and
// asserts the whole story: reconcile re-queues that one job, it converts
// under the same job id to the bytes qemu-img makes here, a second pass
// finds nothing to heal, and the upload became READY once with one
// result. It returns the converted event.
func reconcileHealsOnce(t *testing.T, res *results, readies *atomic.Int64, prefix, key, jobID, want string) events.Converted {
	t.Helper()
	t.Setenv("IMAGEPIPE_RECONCILE_STALE_AFTER", "1s")
	code, stdout, stderr := cli(t, "reconcile", "--prefix", prefix)
	if code != 0 || !strings.Contains(stdout, "healed: requeued 1 (") || !strings.Contains(stdout, key) {
		t.Fatalf("reconcile: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	c := awaitConverted(t, res, key)
	if c.SHA256 != want || c.JobID != jobID {
		t.Errorf("converted job %s sha256 %s; want job %s, sha256 %s", c.JobID, c.SHA256, jobID, want)
	}
	if got, _ := downloadSum(t, c.OutputBucket, c.OutputKey); got != want {
		t.Errorf("stored output sha256 %s, want %s", got, want)
	}

	// A second pass finds nothing to heal, and nothing converts twice.
	code, stdout, _ = cli(t, "reconcile", "--prefix", prefix)
	if code != 0 || !strings.Contains(stdout, "healed: requeued 0 (") || !strings.Contains(stdout, "restored 0 (") {
		t.Errorf("second reconcile: exit %d, %q; want nothing healed", code, stdout)
	}
	// A wait that proves nothing more comes: not scaled.
	time.Sleep(3 * time.Second)
	if n := readies.Load(); n != 1 {
		t.Errorf("%d READY transitions, want exactly 1", n)
	}
	select {
	case m := <-res.ch:
		if ev, err := events.Decode(m.Data); err == nil && ev.Subject == key {
			t.Errorf("a second result for %s: %s %s", key, ev.Type, ev.Data)
		}
	default:
	}
	if got := statusOf(t, "uploads", key); got.State != events.StateReady || got.JobID != jobID || got.OutputKey != c.OutputKey {
		t.Errorf("final status %+v, want READY of job %s at %s", got, jobID, c.OutputKey)
	}
	return c
}

func TestReconcileRestoresALostReadyFromItsOutputWithoutConvertingAgain(t *testing.T) {
	ctx := context.Background()
	res, prefix, key, path := healCase(t, "restore", "done.qcow2", 0x5b)
	upload(t, key, path, false)
	c := awaitConverted(t, res, key)

	kv, err := setup.StatusKV(ctx, e2e.js, 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := kv.Purge(ctx, events.StatusKey("uploads", key)); err != nil {
		t.Fatal(err)
	}
	readies := countReady(t, key)
	before := settledJobs(t)

	code, stdout, stderr := cli(t, "reconcile", "--prefix", prefix)
	if code != 0 || !strings.HasPrefix(stdout, "listed 1, queued 0, refused 0\n") || !strings.Contains(stdout, "healed: requeued 0 (") || !strings.Contains(stdout, "restored 1 (") {
		t.Fatalf("reconcile: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	st := statusOf(t, "uploads", key)
	if st.State != events.StateReady || st.JobID != c.JobID || st.OutputKey != c.OutputKey || st.InputFormat != "qcow2" {
		t.Errorf("restored status %+v, want READY of job %s at %s", st, c.JobID, c.OutputKey)
	}
	time.Sleep(2 * time.Second)
	if got := settledJobs(t) - before; got != 0 {
		t.Errorf("%d jobs ran after the restore, want none", got)
	}
	if n := readies.Load(); n != 1 {
		t.Errorf("%d READY transitions after the record was lost, want 1", n)
	}
}

// A replica that is alive renews its status as it progresses; reconcile
// must leave its job alone even with the job's message out of sight, and
// take it up only once the status stands still.
func TestReconcileNeverRequeuesASlowConversionWhoseStatusKeepsMoving(t *testing.T) {
	ctx := context.Background()
	res, prefix, key, path := healCase(t, "slow", "slow.qcow2", 0x5c)
	want, _ := localRaw(t, path, "qcow2")

	pauseStackConvert(t)
	upload(t, key, path, false)
	queued := awaitState(t, key, events.StateQueued)
	deleteJob(t, queued.JobID)

	kv, err := setup.StatusKV(ctx, e2e.js, 1)
	if err != nil {
		t.Fatal(err)
	}
	statuses := status.New(kv, nil)
	store, err := objstore.New(e2e.stack.s.S3)
	if err != nil {
		t.Fatal(err)
	}
	s := e2e.stack.s
	cfg := s.Ingest
	cfg.ReconcileEvery = 0
	h := ingest.New(cfg, ingest.Deps{
		Status:  statuses,
		Storage: store,
		Publish: func(context.Context, ...events.Message) error {
			return errors.New("reconcile must not queue a new upload here")
		},
		Jobs: jobQueue{e2e.js},
	}, slog.New(slog.DiscardHandler))

	// The replica's progress: CONVERTING, a higher percent every 200ms.
	hbCtx, stopHeartbeat := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		tick := time.NewTicker(200 * time.Millisecond)
		defer tick.Stop()
		for pct := 1.0; ; pct = min(pct+1, 99) {
			_ = statuses.Set(hbCtx, events.Status{Bucket: "uploads", Key: key, JobID: queued.JobID,
				State: events.StateConverting, Percent: pct, Attempt: 1})
			select {
			case <-hbCtx.Done():
				return
			case <-tick.C:
			}
		}
	})
	t.Cleanup(func() { stopHeartbeat(); wg.Wait() })

	const staleAfter = time.Second
	for i := range 8 {
		r, err := h.ReconcileWith(ctx, prefix, staleAfter)
		if err != nil {
			t.Fatal(err)
		}
		if r.Requeued != 0 {
			t.Fatalf("pass %d re-queued a conversion whose status moves: %+v", i, r)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if ids, err := (jobQueue{e2e.js}).JobIDs(ctx); err != nil || ids[queued.JobID] {
		t.Fatalf("job in the queue after passes over a live conversion (err %v)", err)
	}

	// Once the replica falls silent, the same pass takes the job up.
	stopHeartbeat()
	wg.Wait()
	time.Sleep(2 * staleAfter)
	r, err := h.ReconcileWith(ctx, prefix, staleAfter)
	if err != nil || r.Requeued != 1 {
		t.Fatalf("after the status stood still: %+v, %v; want 1 requeued", r, err)
	}
	e2e.stack.workers["convert"].Resume()
	if c := awaitConverted(t, res, key); c.SHA256 != want || c.JobID != queued.JobID {
		t.Errorf("converted job %s sha256 %s; want job %s, sha256 %s", c.JobID, c.SHA256, queued.JobID, want)
	}
}

// awaitState waits until the input's status says state, and returns it.
func awaitState(t *testing.T, key string, state events.State) events.Status {
	t.Helper()
	deadline := time.Now().Add(scaled(30 * time.Second))
	for {
		if hasStatus(t, "uploads", key) {
			if st := statusOf(t, "uploads", key); st.State == state {
				return st
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never reached %s", key, state)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// deleteJob removes the job's message from JOBS, as a lost write would.
// ingest records QUEUED before it publishes, so the message may be a
// moment behind the status.
func deleteJob(t *testing.T, jobID string) {
	t.Helper()
	ctx := context.Background()
	stream, err := e2e.js.Stream(ctx, events.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(scaled(10 * time.Second))
	for {
		for seq := uint64(1); ; {
			m, err := stream.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(events.SubjectConvertJob))
			if errors.Is(err, jetstream.ErrMsgNotFound) {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if orphan.JobIDOf(m.Data) == jobID {
				if err := stream.DeleteMsg(ctx, m.Sequence); err != nil {
					t.Fatal(err)
				}
				return
			}
			seq = m.Sequence + 1
		}
		if time.Now().After(deadline) {
			t.Fatalf("no message of job %s in %s", jobID, events.StreamJobs)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// countReady counts the READY records written for the input from now on.
func countReady(t *testing.T, key string) *atomic.Int64 {
	t.Helper()
	var n atomic.Int64
	onStatus(t, key, func(st events.Status) {
		if st.State == events.StateReady {
			n.Add(1)
		}
	})
	return &n
}

// runPrefix is a folder under base of this run's own.
// healCase is what a reconcile test on the stack starts from: the results
// as they come, a folder of its own each run (a repeated run, -count, must
// not find the last run's READY for the same content), the key of its
// upload there, and the image to upload, of content no other run has.
func healCase(t *testing.T, folder, name string, pattern byte) (res *results, prefix, key, path string) {
	t.Helper()
	stackEnv(t)
	res = subscribeResults(t)
	prefix = runPrefix("e2e/reconcile-heal/" + folder + "/")
	return res, prefix, prefix + name, runImage(t, name, pattern)
}

func runPrefix(base string) string {
	return fmt.Sprintf("%s%d/", base, time.Now().UnixNano())
}

var runs atomic.Int64

// runImage is a small qcow2 whose content no earlier run of the test in
// this process has (the stack, and its record of converted content, is the
// process's own), so that content de-duplication never answers for it.
func runImage(t *testing.T, name string, pattern byte) string {
	t.Helper()
	path := smallQcow2(t, name, pattern)
	runTool(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x%02x 2M 64k", byte(runs.Add(1))), path)
	return path
}
