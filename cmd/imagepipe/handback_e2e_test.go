package main

import (
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/test/stack"
)

// The job of an upload's first version is still at work when the second
// version's job has finished. Whatever the older job does on its way out
// (its upload's progress, its end as superseded, its hand-back), a watcher
// of the upload's status sees the newer job finish once, and never sees
// the record go back to the older job after it.
func TestSupersededJobNeitherHidesNorRepeatsTheNewerVersionsReady(t *testing.T) {
	res := subscribeResults(t)
	dir := t.TempDir()
	key := runPrefix("e2e/versions/handback/") + "disk.qcow2"
	// 64 MiB of raw output: uploaded once converted, with progress.
	v1 := makeSizedImage(t, dir, "v1.qcow2", "qcow2", "64M", "write -P 0x31 0 8M", "write -P 0x32 40M 8M")
	v2 := runImage(t, "v2.qcow2", 0x42)
	want2, _ := localRaw(t, v2, "qcow2")

	// A second conversion of the first version, as a re-convert queues
	// one, held just before its output upload starts.
	older, held, done := reconvertHeld(t, res, key, v1)

	states := watchStatus(t, key)
	upload(t, key, v2, false)
	var newer events.Converted
	if err := res.await(t, key, stack.Scaled(120*time.Second)).DecodeData(events.TypeConverted, &newer); err != nil {
		t.Fatal(err)
	}
	if newer.SHA256 != want2 {
		t.Fatalf("second version's sha256 %s, want %s", newer.SHA256, want2)
	}
	awaitStatus(t, states, func(st events.Status) bool { return st.State == events.StateReady && st.JobID == newer.JobID })

	// The older job goes on: it uploads, with progress, and ends superseded.
	close(held.release)
	if o := <-done; o.err != nil {
		t.Fatalf("the older job ended with %v; want a quiet end, superseded", o.err)
	}
	time.Sleep(2 * time.Second) // any late write of the older job lands by now
	for {
		select {
		case st := <-states:
			if st.JobID == older.JobID {
				t.Errorf("after the newer job's READY the record went back to the older job: %s", st.State)
			}
			if st.State == events.StateReady && st.JobID == newer.JobID {
				t.Errorf("the newer job's READY was written again (attempt %d)", st.Attempt)
			}
			continue
		default:
		}
		break
	}
	if st := statusOf(t, "uploads", key); st.State != events.StateReady || st.JobID != newer.JobID || st.OutputKey != newer.OutputKey {
		t.Errorf("status %+v, want READY of the second version's job %s", st, newer.JobID)
	}
}
