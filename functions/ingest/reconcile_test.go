package ingest

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/objstore"
)

func TestReconcileQueuesExactlyTheUploadsNoNotificationBroughtIn(t *testing.T) {
	ctx := context.Background()
	lost := objstore.Object{Bucket: "uploads", Key: "lost.vhdx", Size: 10, ETag: "e-lost", Metadata: map[string]string{}, LastModified: testNow.Add(-time.Hour)}
	seen := objstore.Object{Bucket: "uploads", Key: "seen.vhdx", Size: 10, ETag: "e-seen", Metadata: map[string]string{}, LastModified: testNow.Add(-time.Hour)}
	overwritten := objstore.Object{Bucket: "uploads", Key: "overwritten.vhdx", Size: 10, ETag: "e-new", Metadata: map[string]string{}, LastModified: testNow.Add(-time.Minute)}
	reconverted := objstore.Object{Bucket: "uploads", Key: "reconverted.vhdx", Size: 10, ETag: "e-rc", Metadata: map[string]string{}, LastModified: testNow.Add(-time.Hour)}
	big := objstore.Object{Bucket: "uploads", Key: "big.vhdx", Size: 1 << 50, ETag: "e-big", Metadata: map[string]string{}, LastModified: testNow.Add(-time.Hour)}
	skipped := []objstore.Object{
		{Bucket: "uploads", Key: "notes.txt", Size: 10, ETag: "e1", Metadata: map[string]string{}},
		{Bucket: "uploads", Key: "empty.vhdx", Size: 0, ETag: "e2", Metadata: map[string]string{}},
		{Bucket: "uploads", Key: "errors/x.vhdx", Size: 10, ETag: "e3", Metadata: map[string]string{}},
		{Bucket: "uploads", Key: "out.vhdx.raw", Size: 10, ETag: "e4", Metadata: map[string]string{"X-Amz-Meta-Imagepipe-Output": "true"}},
	}
	r := newRig(Config{}, append(skipped, lost, seen, overwritten, reconverted, big)...)
	ident := func(o objstore.Object) string { return events.ObjectIdentity(o.Bucket, o.Key, o.VersionID, o.ETag) }
	r.status.Set(ctx, events.Status{Bucket: "uploads", Key: "seen.vhdx", JobID: events.JobIDFor(ident(seen)), State: events.StateReady, UpdatedAt: testNow.Add(-2 * time.Hour)})
	r.status.Set(ctx, events.Status{Bucket: "uploads", Key: "overwritten.vhdx", JobID: "job-of-old-content", State: events.StateReady, UpdatedAt: testNow.Add(-time.Hour)})
	r.status.Set(ctx, events.Status{Bucket: "uploads", Key: "reconverted.vhdx", JobID: "a-reconvert", State: events.StateConverting, UpdatedAt: testNow.Add(-time.Minute)})

	res, err := r.h.Reconcile(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if res.Listed != 9 || res.Queued != 2 || res.Refused != 2 {
		t.Errorf("result = %+v, want 9 listed, 2 queued, 2 refused (notes.txt and big.vhdx)", res)
	}
	jobs := map[string]events.Message{}
	for _, m := range r.pub.all() {
		if m.Subject == events.SubjectConvertJob {
			jobs[decodeJob(t, m).Key] = m
		}
	}
	for _, o := range []objstore.Object{lost, overwritten} {
		m, ok := jobs[o.Key]
		if !ok {
			t.Errorf("%s not queued", o.Key)
			continue
		}
		// The same job the notification would have made.
		job := decodeJob(t, m)
		if m.Event.ID != ident(o) || job.JobID != events.JobIDFor(ident(o)) || job.Reason != "reconcile" || job.ETag != o.ETag {
			t.Errorf("%s: event id %s job %+v; want the notification's identity", o.Key, m.Event.ID, job)
		}
		if st, _ := r.status.record("uploads", o.Key); st.State != events.StateQueued || st.JobID != job.JobID {
			t.Errorf("%s status = %+v", o.Key, st)
		}
	}
	if len(jobs) != 2 {
		t.Errorf("jobs for %v, want lost and overwritten only", keys(jobs))
	}
	if st, _ := r.status.record("uploads", "big.vhdx"); st.State != events.StateFailed {
		t.Errorf("oversized object status = %+v, want FAILED", st)
	}

	// A second pass finds nothing more to do.
	before := len(r.pub.all())
	res, err = r.h.Reconcile(ctx, "")
	if err != nil || res.Queued != 0 || res.Refused != 0 || len(r.pub.all()) != before {
		t.Errorf("second pass = %+v, err %v, %d new messages", res, err, len(r.pub.all())-before)
	}
}

func keys(m map[string]events.Message) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestReconcileListsOnlyTheConfiguredOrRequestedPrefixes(t *testing.T) {
	objs := []objstore.Object{
		{Bucket: "uploads", Key: "a/1.vhdx", Size: 1, ETag: "1", Metadata: map[string]string{}},
		{Bucket: "uploads", Key: "b/2.vhdx", Size: 1, ETag: "2", Metadata: map[string]string{}},
		{Bucket: "uploads", Key: "c/3.vhdx", Size: 1, ETag: "3", Metadata: map[string]string{}},
	}
	r := newRig(Config{Prefixes: []string{"a/", "b/"}}, objs...)
	res, err := r.h.Reconcile(context.Background(), "")
	if err != nil || res.Listed != 2 || res.Queued != 2 {
		t.Errorf("configured prefixes: %+v, err %v; want a/ and b/ listed", res, err)
	}
	r = newRig(Config{}, objs...)
	res, err = r.h.Reconcile(context.Background(), "c/")
	if err != nil || res.Listed != 1 || res.Queued != 1 || res.Keys[0] != "c/3.vhdx" {
		t.Errorf("requested prefix: %+v, err %v", res, err)
	}
}

type fakeLease struct {
	grant    bool
	attempts atomic.Int32
}

func (l *fakeLease) Acquire(context.Context) (bool, error) {
	l.attempts.Add(1)
	return l.grant, nil
}

func TestPeriodicReconcileRunsOnlyWhileHoldingTheLease(t *testing.T) {
	obj := objstore.Object{Bucket: "uploads", Key: "lost.vhdx", Size: 10, ETag: "e", Metadata: map[string]string{}}
	for _, grant := range []bool{false, true} {
		r := newRig(Config{}, obj)
		lease := &fakeLease{grant: grant}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { r.h.RunReconcile(ctx, 20*time.Millisecond, lease); close(done) }()
		deadline := time.Now().Add(5 * time.Second)
		for lease.attempts.Load() < 3 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		cancel()
		<-done
		queued := len(r.pub.all())
		if grant && queued != 1 || !grant && queued != 0 {
			t.Errorf("lease granted %v: %d jobs after %d periods", grant, queued, lease.attempts.Load())
		}
	}
}
