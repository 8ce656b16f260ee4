package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/notify"
	"github.com/imagepipe/imagepipe/internal/orphan"
	"github.com/imagepipe/imagepipe/internal/status"
	"github.com/imagepipe/imagepipe/test/stack"
)

// An upload whose job message is lost leaves an empty queue behind: the
// queue's depth, the stall watchdog's old rule, and every replica say all
// is well. The watchdog (its alert and its metric) and `ctl stats` count
// it from its status all the same, and stop once reconcile queued it again.
//
// The stack is one of its own, with the functions as processes: the shared
// stack's watchdog holds the one lease and looks once a minute.
func TestUploadWhoseJobIsLostIsCountedByTheWatchdogMetricAndCtlStats(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	bin, err := stack.Build(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	metricsAddr := freeAddr(t)
	st, err := stack.Start(ctx, stack.Config{
		Dir: dir, Binary: bin,
		Env: map[string]string{"IMAGEPIPE_RECONCILE_STALE_AFTER": "1s"},
		FunctionEnv: map[string]map[string]string{"notify": {
			"IMAGEPIPE_METRICS_ADDR":      metricsAddr,
			"IMAGEPIPE_STALL_CHECK_EVERY": "300ms",
			"IMAGEPIPE_STALL_AFTER":       "2s",
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(st.LogTail(6000))
		}
		st.Close()
	})
	alerts := make(chan *nats.Msg, 64)
	sub, err := st.NC.ChanSubscribe(events.SubjectStalled, alerts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	// Convert paused: the job waits in the queue until the test loses it.
	if err := st.WaitConsumers(ctx); err != nil {
		t.Fatal(err)
	}
	runBin(t, bin, st, "ctl", "pause", "--function", "convert", "--timeout", stack.Scaled(5*time.Second).String())

	key := "lost/disk.qcow2"
	path := runImage(t, "disk.qcow2", 0x4e)
	want, _ := localRaw(t, path, "qcow2")
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	fi, _ := f.Stat()
	_, err = st.S3.PutObject(ctx, stack.InputBucket, key, f, fi.Size(), minio.PutObjectOptions{DisableMultipart: true})
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	kv, err := st.JS.KeyValue(ctx, events.StatusBucket)
	if err != nil {
		t.Fatal(err)
	}
	statuses := status.New(kv, nil)
	queued := awaitStackState(t, statuses, key, events.StateQueued)

	// Queued, its job in the queue: nothing is missing.
	time.Sleep(2 * time.Second) // the status is stale by now; only the queue holds it up
	awaitGauge(t, metricsAddr, 0)
	if rep := ctlStatsOf(t, bin, st); rep.Orphaned == nil || rep.Orphaned.Uploads != 0 {
		t.Fatalf("ctl stats counts %+v uploads with no job while the job waits in the queue", rep.Orphaned)
	}

	deleteStackJob(t, st.JS, queued.JobID)
	awaitGauge(t, metricsAddr, 1)
	rep := ctlStatsOf(t, bin, st)
	if rep.Orphaned == nil || rep.Orphaned.Uploads != 1 || !slices.Equal(rep.Orphaned.Keys, []string{stack.InputBucket + "/" + key}) || rep.Queue.Depth != 0 {
		t.Errorf("ctl stats: queue %+v, no job %+v; want an empty queue and the one upload with no job", rep.Queue, rep.Orphaned)
	}
	if out := runBin(t, bin, st, "ctl", "stats"); !strings.Contains(out, "no job") || !strings.Contains(out, stack.InputBucket+"/"+key) {
		t.Errorf("ctl stats does not show the upload with no job:\n%s", out)
	}
	// The paused queue itself may have been reported stalled before its
	// job was lost; the alert about the lost upload is the one after.
	a := awaitAlert(t, alerts, events.TypeStalled, func(a notify.QueueAlert) bool { return a.Orphaned > 0 })
	if a.QueueDepth != 0 || a.Orphaned != 1 || !slices.Equal(a.OrphanedKeys, []string{stack.InputBucket + "/" + key}) {
		t.Errorf("stall alert %+v; want depth 0 and the upload named", a)
	}

	// Healed: the job is back in the queue, and then converted.
	if out := runBin(t, bin, st, "reconcile"); !strings.Contains(out, "healed: requeued 1 (") {
		t.Fatalf("reconcile:\n%s", out)
	}
	awaitGauge(t, metricsAddr, 0)
	awaitAlert(t, alerts, events.TypeQueueRecover, func(notify.QueueAlert) bool { return true })
	runBin(t, bin, st, "ctl", "resume", "--function", "convert", "--timeout", stack.Scaled(5*time.Second).String())
	ready := awaitStackState(t, statuses, key, events.StateReady)
	if ready.JobID != queued.JobID {
		t.Errorf("READY of job %s, want the lost job %s", ready.JobID, queued.JobID)
	}
	tags, err := st.S3.GetObjectTagging(ctx, stack.OutputBucket, ready.OutputKey, minio.GetObjectTaggingOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := tags.ToMap()["imagepipe-sha256"]; got != want {
		t.Errorf("output sha256 %s, want %s", got, want)
	}
	if rep := ctlStatsOf(t, bin, st); rep.Orphaned == nil || rep.Orphaned.Uploads != 0 {
		t.Errorf("ctl stats counts %+v uploads with no job after the upload became READY", rep.Orphaned)
	}
}

func awaitStackState(t *testing.T, statuses *status.Store, key string, state events.State) events.Status {
	t.Helper()
	deadline := time.Now().Add(stack.Scaled(60 * time.Second))
	for {
		st, err := statuses.Get(context.Background(), stack.InputBucket, key)
		if err == nil && st.State == state {
			return st
		}
		if err != nil && !errors.Is(err, status.ErrNotFound) {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never reached %s (last %s, err %v)", key, state, st.State, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// deleteStackJob removes the job's message from JOBS, as a lost write
// would.
func deleteStackJob(t *testing.T, js jetstream.JetStream, jobID string) {
	t.Helper()
	ctx := context.Background()
	stream, err := js.Stream(ctx, events.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(stack.Scaled(10 * time.Second))
	for {
		m, err := stream.GetLastMsgForSubject(ctx, events.SubjectConvertJob)
		if err == nil && orphan.JobIDOf(m.Data) == jobID {
			if err := stream.DeleteMsg(ctx, m.Sequence); err != nil {
				t.Fatal(err)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no message of job %s in %s (%v)", jobID, events.StreamJobs, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// awaitGauge waits until notify's /metrics shows want uploads with no job.
func awaitGauge(t *testing.T, addr string, want float64) {
	t.Helper()
	deadline := time.Now().Add(stack.Scaled(30 * time.Second))
	var got *float64
	for {
		if fam := scrapeMetrics(t, addr)["imagepipe_uploads_without_job"]; fam != nil && len(fam.GetMetric()) == 1 {
			v := fam.GetMetric()[0].GetGauge().GetValue()
			got = &v
			if v == want {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("imagepipe_uploads_without_job is %v, want %v", deref(got), want)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func deref(p *float64) any {
	if p == nil {
		return "absent"
	}
	return *p
}

// awaitAlert returns the first alert of type typ that ok accepts.
func awaitAlert(t *testing.T, alerts <-chan *nats.Msg, typ string, ok func(notify.QueueAlert) bool) notify.QueueAlert {
	t.Helper()
	deadline := time.After(stack.Scaled(30 * time.Second))
	for {
		select {
		case m := <-alerts:
			ev, err := events.Decode(m.Data)
			if err != nil || ev.Type != typ {
				continue
			}
			var a notify.QueueAlert
			if err := ev.DecodeData(typ, &a); err != nil {
				t.Fatal(err)
			}
			if ok(a) {
				return a
			}
		case <-deadline:
			t.Fatalf("no %s alert", typ)
		}
	}
}

func ctlStatsOf(t *testing.T, bin string, st *stack.Stack) fleetReport {
	t.Helper()
	var rep fleetReport
	out := runBin(t, bin, st, "ctl", "stats", "--json")
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("ctl stats --json: %v\n%s", err, out)
	}
	return rep
}

// runBin runs the imagepipe command against the stack, as an operator
// whose environment points at it would, and returns its output.
func runBin(t *testing.T, bin string, st *stack.Stack, args ...string) string {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME"), "TMPDIR=" + t.TempDir(),
		"IMAGEPIPE_NATS_URL=" + st.NATSURL(), "IMAGEPIPE_RECONCILE_STALE_AFTER=1s"}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("imagepipe %s: %v\n%s%s", strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String()
}
