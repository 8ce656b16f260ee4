package ingest

import (
	"context"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/objstore"
)

// healRig is a rig with one upload, its status record, and a job queue.
func healRig(t *testing.T, st *events.Status, held bool) (*testRig, *fakeJobs, objstore.Object, string) {
	t.Helper()
	obj := objstore.Object{Bucket: "uploads", Key: "disk.vhdx", Size: 10, ETag: "e-1", Metadata: map[string]string{}, LastModified: testNow.Add(-2 * time.Hour)}
	r := newRig(Config{}, obj)
	identity := events.ObjectIdentity(obj.Bucket, obj.Key, obj.VersionID, obj.ETag)
	jobs := &fakeJobs{held: map[string]bool{}, seenIDs: map[string]bool{}}
	r.h.deps.Jobs = jobs
	if st != nil {
		st.Bucket, st.Key = obj.Bucket, obj.Key
		if st.JobID == "" {
			st.JobID = events.JobIDFor(identity)
		}
		if err := r.status.Set(context.Background(), *st); err != nil {
			t.Fatal(err)
		}
		jobs.held[st.JobID] = held
	}
	return r, jobs, obj, identity
}

func TestReconcileRequeuesTheSameJobWhenAStuckStatusHasNoJobInTheQueue(t *testing.T) {
	stale := testNow.Add(-DefaultReconcileStaleAfter - time.Minute)
	for _, state := range []events.State{events.StateQueued, events.StateDownloading, events.StateInspecting, events.StateConverting, events.StateUploading} {
		t.Run(string(state), func(t *testing.T) {
			r, jobs, obj, identity := healRig(t, &events.Status{State: state, Attempt: 2, UpdatedAt: stale}, false)
			res, err := r.h.Reconcile(context.Background(), "")
			if err != nil {
				t.Fatal(err)
			}
			if res.Requeued != 1 || res.Queued != 0 || len(res.Keys) != 1 || res.Keys[0] != obj.Key {
				t.Fatalf("result %+v, want the upload requeued", res)
			}
			if len(jobs.requeued) != 1 || len(r.pub.all()) != 0 {
				t.Fatalf("requeued %d, published %d; want one requeue and no new job", len(jobs.requeued), len(r.pub.all()))
			}
			m := jobs.requeued[0]
			job := decodeJob(t, m)
			if m.Event.ID != identity || job.JobID != events.JobIDFor(identity) || job.Reason != ReasonReconcile || job.ETag != obj.ETag {
				t.Errorf("event id %s job %+v; want the notification's identity and job id", m.Event.ID, job)
			}
			if job.PriorAttempts != 2 {
				t.Errorf("job carries %d prior attempts, want the record's 2: convert's states would count from 1 and be refused", job.PriorAttempts)
			}
			st, _ := r.status.record(obj.Bucket, obj.Key)
			if st.State != events.StateQueued || st.JobID != job.JobID || st.Attempt != 2 || !st.UpdatedAt.Equal(testNow) {
				t.Errorf("status %+v, want QUEUED now, same job and attempt", st)
			}
		})
	}
}

func TestReconcileLeavesAJobThatIsQueuedOrMovingOrEnded(t *testing.T) {
	stale := testNow.Add(-DefaultReconcileStaleAfter - time.Minute)
	cases := []struct {
		name string
		st   events.Status
		held bool
	}{
		{"stuck but its message is in the queue", events.Status{State: events.StateConverting, UpdatedAt: stale}, true},
		{"message gone but the status moved within the bound", events.Status{State: events.StateConverting, UpdatedAt: testNow.Add(-DefaultReconcileStaleAfter + time.Minute)}, false},
		{"ended long ago", events.Status{State: events.StateReady, UpdatedAt: stale}, false},
		{"failed long ago", events.Status{State: events.StateFailed, UpdatedAt: stale}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			st := tc.st
			r, jobs, obj, _ := healRig(t, &st, tc.held)
			res, err := r.h.Reconcile(context.Background(), "")
			if err != nil {
				t.Fatal(err)
			}
			if res.Requeued != 0 || res.Queued != 0 || res.Restored != 0 || len(jobs.requeued) != 0 || len(r.pub.all()) != 0 {
				t.Errorf("result %+v, requeued %d; want nothing done", res, len(jobs.requeued))
			}
			if got, _ := r.status.record(obj.Bucket, obj.Key); got != st {
				t.Errorf("status changed to %+v", got)
			}
		})
	}
}

func TestReconcileRequeuesUnderASecondIdWhenTheDuplicateWindowRemembersALostMessage(t *testing.T) {
	stale := testNow.Add(-DefaultReconcileStaleAfter - time.Minute)
	r, jobs, _, identity := healRig(t, &events.Status{State: events.StateQueued, UpdatedAt: stale}, false)
	jobs.seenIDs[identity] = true
	res, err := r.h.Reconcile(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	if res.Requeued != 1 || len(jobs.requeued) != 1 {
		t.Fatalf("result %+v, %d requeued; want one", res, len(jobs.requeued))
	}
	m := jobs.requeued[0]
	if m.Event.ID != requeueEventID(identity) || decodeJob(t, m).JobID != events.JobIDFor(identity) {
		t.Errorf("event id %s job %s; want the derived id and the same job", m.Event.ID, decodeJob(t, m).JobID)
	}
}

func TestReconcileRequeuesAStuckReconvertUnderItsOwnJobId(t *testing.T) {
	stale := testNow.Add(-DefaultReconcileStaleAfter - time.Minute)
	r, jobs, _, _ := healRig(t, &events.Status{JobID: "a-reconvert", State: events.StateDownloading, UpdatedAt: stale}, false)
	// A re-convert's record is newer than its object.
	res, err := r.h.Reconcile(context.Background(), "")
	if err != nil {
		t.Fatal(err)
	}
	if res.Requeued != 1 || len(jobs.requeued) != 1 {
		t.Fatalf("result %+v; want the re-convert requeued", res)
	}
	m := jobs.requeued[0]
	if job := decodeJob(t, m); m.Event.ID != "a-reconvert" || job.JobID != "a-reconvert" || !job.NoDedup {
		t.Errorf("event id %s job %+v; want the re-convert's id, no dedup", m.Event.ID, job)
	}
}

func TestReconcileRestoresReadyFromACompleteOutputInsteadOfConvertingAgain(t *testing.T) {
	outKey := events.OutputKey("", "disk.vhdx", "raw")
	output := func(r *testRig, jobID string, tagged bool) {
		r.storage.objects["images/"+outKey] = objstore.Object{Bucket: "images", Key: outKey, Size: 64,
			Metadata: map[string]string{"imagepipe-job": jobID, "imagepipe-input-format": "vhdx", "imagepipe-output": "true"}}
		if tagged {
			r.storage.tags = map[string]map[string]string{"images/" + outKey: {"imagepipe-sha256": "abc"}}
		}
	}
	stale := testNow.Add(-DefaultReconcileStaleAfter - time.Minute)
	cases := []struct {
		name         string
		st           *events.Status
		ownJob       bool
		tagged       bool
		wantRestored bool
	}{
		{"status lost, output complete", nil, true, true, true},
		{"status stuck, output complete", &events.Status{State: events.StateUploading, Attempt: 1, UpdatedAt: stale}, true, true, true},
		{"status lost, output untagged", nil, true, false, false},
		{"status lost, output of another version", nil, false, true, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r, jobs, obj, identity := healRig(t, tc.st, false)
			jobID := events.JobIDFor(identity)
			if !tc.ownJob {
				jobID = events.JobIDFor("another version")
			}
			output(r, jobID, tc.tagged)
			res, err := r.h.Reconcile(context.Background(), "")
			if err != nil {
				t.Fatal(err)
			}
			st, _ := r.status.record(obj.Bucket, obj.Key)
			if !tc.wantRestored {
				if res.Restored != 0 || res.Queued+res.Requeued != 1 {
					t.Errorf("result %+v; want the upload converted", res)
				}
				return
			}
			if res.Restored != 1 || res.Queued != 0 || res.Requeued != 0 || len(jobs.requeued) != 0 || len(r.pub.all()) != 0 {
				t.Fatalf("result %+v; want READY restored and no job", res)
			}
			if st.State != events.StateReady || st.JobID != events.JobIDFor(identity) || st.OutputBucket != "images" ||
				st.OutputKey != outKey || st.InputFormat != "vhdx" {
				t.Errorf("status %+v, want READY of the output", st)
			}
		})
	}
}

func TestStaleBoundOutlastsAckWaitAndTheLongestBackOff(t *testing.T) {
	cases := []struct {
		ackWait time.Duration
		backoff []time.Duration
		want    time.Duration
	}{
		{time.Minute, []time.Duration{5 * time.Minute, 10 * time.Minute, 20 * time.Minute}, 21 * time.Minute},
		{10 * time.Minute, []time.Duration{time.Minute}, 21 * time.Minute},
		{10 * time.Second, nil, 80 * time.Second},
	}
	for _, tc := range cases {
		if got := StaleBound(tc.ackWait, tc.backoff); got != tc.want {
			t.Errorf("StaleBound(%s, %v) = %s, want %s", tc.ackWait, tc.backoff, got, tc.want)
		}
	}
}
