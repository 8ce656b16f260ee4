package ingest

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/lease"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/natstest"
	"github.com/imagepipe/imagepipe/internal/orphan"
	"github.com/imagepipe/imagepipe/internal/setup/setuptest"
	"github.com/imagepipe/imagepipe/internal/status"
	"github.com/imagepipe/imagepipe/test/stack"
)

// streamJobs is the JOBS stream as a replica's reconcile reads and feeds
// it: the queue's job ids read by sequence, and a requeue published with
// its event id as Nats-Msg-Id, reporting the stream's duplicate verdict.
type streamJobs struct{ js jetstream.JetStream }

var _ JobQueue = streamJobs{}

func (q streamJobs) JobIDs(ctx context.Context) (map[string]bool, error) {
	return orphan.JobIDs(ctx, q.js)
}

func (q streamJobs) Requeue(ctx context.Context, msg events.Message) (bool, error) {
	data, err := json.Marshal(msg.Event)
	if err != nil {
		return false, err
	}
	ack, err := q.js.PublishMsg(ctx, &nats.Msg{Subject: msg.Subject, Data: data}, jetstream.WithMsgID(msg.Event.ID))
	if err != nil {
		return false, fmt.Errorf("publish %s: %w", msg.Subject, err)
	}
	return ack.Duplicate, nil
}

// countedLease is the reconcile lease a replica holds, counting the periods
// it was granted, so a test knows how many passes have run.
type countedLease struct {
	*lease.Lease
	granted atomic.Int32
}

func (l *countedLease) Acquire(ctx context.Context) (bool, error) {
	ok, err := l.Lease.Acquire(ctx)
	if ok {
		l.granted.Add(1)
	}
	return ok, err
}

func TestPeriodicReconcileRequeuesAStuckUploadWhoseJobIsLost(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(2*time.Minute))
	defer cancel()
	world := setuptest.Start(t, stack.FreshMinIO(t))
	js, kv, store, in, out := world.JS, world.KV, world.Store, world.In, world.Out
	const key = "disk.vhdx"
	if err := store.PutBytes(ctx, in, key, []byte("vhdxfile and then some"), "application/octet-stream", nil); err != nil {
		t.Fatal(err)
	}
	obj, err := store.Stat(ctx, in, key)
	if err != nil {
		t.Fatal(err)
	}
	identity := events.ObjectIdentity(obj.Bucket, obj.Key, obj.VersionID, obj.ETag)
	jobID := events.JobIDFor(identity)

	// The job was on a replica, converting, when its message was lost:
	// the status stands still and JOBS is empty.
	natstest.PutStatus(t, kv, events.Status{Bucket: in, Key: key, JobID: jobID, State: events.StateConverting,
		Attempt: 2, UpdatedAt: time.Now().UTC().Add(-time.Hour)})

	// The stale bound is shorter than a period, so every pass after the
	// requeue finds the new QUEUED record stale too: only the job's
	// presence in JOBS keeps those passes from queueing it again.
	const every, staleAfter = 400 * time.Millisecond, 100 * time.Millisecond
	cfg := Config{InputBucket: in, OutputBucket: out, ReconcileEvery: every, ReconcileStaleAfter: staleAfter}
	l, err := lease.Open(ctx, js, cfg.ReconcileLease(1), ReconcileLeaseKey, "reconcile", nil)
	if err != nil {
		t.Fatal(err)
	}
	counted := &countedLease{Lease: l}
	// Publish is how ingest queues a new job; a stuck status must not
	// get one, only its own job requeued.
	var published atomic.Int32
	h := New(cfg, Deps{
		Status:  status.New(kv, nil),
		Storage: store,
		Publish: func(ctx context.Context, msgs ...events.Message) error {
			published.Add(int32(len(msgs)))
			return natsrt.Publish(ctx, js, msgs...)
		},
		Jobs: streamJobs{js},
	}, slog.New(slog.DiscardHandler))

	runCtx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { h.RunReconcile(runCtx, every, counted); close(done) }()
	defer func() { stop(); <-done }()

	stream, err := js.Stream(ctx, events.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	jobsHeld := func() uint64 {
		t.Helper()
		info, err := stream.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return info.State.Msgs
	}
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		for !ok() {
			select {
			case <-ctx.Done():
				t.Fatalf("timed out waiting for %s (%d periods granted)", what, counted.granted.Load())
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	waitFor("the lost job in JOBS", func() bool { return jobsHeld() > 0 })
	// The pass that requeued was granted at most this many periods in;
	// the two passes after it have run whole once a third after it has
	// been granted.
	requeuedBy := counted.granted.Load()
	waitFor("three more periods", func() bool { return counted.granted.Load() >= requeuedBy+3 })
	stop()
	<-done

	info, err := stream.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n := published.Load(); n != 0 {
		t.Errorf("%d messages published as new; want the lost job requeued, nothing else", n)
	}
	if info.State.Msgs != 1 || info.State.LastSeq != 1 {
		t.Fatalf("JOBS holds %d messages, last sequence %d, after %d periods; want the one requeue",
			info.State.Msgs, info.State.LastSeq, counted.granted.Load())
	}
	raw, err := stream.GetMsg(ctx, 1)
	if err != nil {
		t.Fatal(err)
	}
	ev, err := events.Decode(raw.Data)
	if err != nil {
		t.Fatal(err)
	}
	m := events.Message{Subject: raw.Subject, Event: ev}
	job := decodeJob(t, m)
	if raw.Subject != events.SubjectConvertJob || raw.Header.Get(jetstream.MsgIDHeader) != identity || m.Event.ID != identity {
		t.Errorf("subject %s, Nats-Msg-Id %q, event id %s; want %s under the notification's identity %s",
			raw.Subject, raw.Header.Get(jetstream.MsgIDHeader), m.Event.ID, events.SubjectConvertJob, identity)
	}
	if job.JobID != jobID || job.Reason != ReasonReconcile || job.Bucket != in || job.Key != key || job.ETag != obj.ETag {
		t.Errorf("job %+v; want job %s of %s/%s etag %s, reason %s", job, jobID, in, key, obj.ETag, ReasonReconcile)
	}
	if job.PriorAttempts != 2 {
		t.Errorf("job carries %d prior attempts, want the record's 2: convert's states would count from 1 and be refused", job.PriorAttempts)
	}
	st, err := status.New(kv, nil).Get(ctx, in, key)
	if err != nil {
		t.Fatal(err)
	}
	if st.State != events.StateQueued || st.JobID != jobID || st.Attempt != 2 {
		t.Errorf("status %+v, want QUEUED, same job and attempt", st)
	}
}
