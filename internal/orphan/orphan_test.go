package orphan_test

import (
	"context"
	"encoding/json"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/natstest"
	"github.com/imagepipe/imagepipe/internal/orphan"
)

func TestFindCountsOnlyStaleNonFinalUploadsWhoseJobTheQueueDoesNotHold(t *testing.T) {
	ctx := context.Background()
	_, js := natstest.Start(t)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name: events.StreamJobs, Subjects: []string{events.SubjectConvertJob}, Retention: jetstream.WorkQueuePolicy,
	}); err != nil {
		t.Fatal(err)
	}
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: events.StatusBucket})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	const staleAfter = time.Minute
	old, older, fresh := now.Add(-10*time.Minute), now.Add(-20*time.Minute), now.Add(-10*time.Second)
	records := []events.Status{
		{Key: "lost-queued", JobID: "j1", State: events.StateQueued, UpdatedAt: old},           // counted
		{Key: "lost-converting", JobID: "j2", State: events.StateConverting, UpdatedAt: older}, // counted, oldest
		{Key: "waiting", JobID: "j3", State: events.StateQueued, UpdatedAt: old},               // its job is queued
		{Key: "moving", JobID: "j4", State: events.StateConverting, UpdatedAt: fresh},          // progresses
		{Key: "ready", JobID: "j5", State: events.StateReady, UpdatedAt: older},                // final
		{Key: "failed", JobID: "j6", State: events.StateFailed, UpdatedAt: older},              // final
	}
	for _, st := range records {
		st.Bucket = "uploads"
		b, _ := json.Marshal(st)
		if _, err := kv.Put(ctx, events.StatusKey(st.Bucket, st.Key), b); err != nil {
			t.Fatal(err)
		}
	}
	ev, err := events.New("e3", events.TypeConvertJob, "/test", "waiting", now, events.ConvertJob{JobID: "j3", Bucket: "uploads", Key: "waiting"})
	if err != nil {
		t.Fatal(err)
	}
	body, _ := json.Marshal(ev)
	if _, err := js.Publish(ctx, events.SubjectConvertJob, body); err != nil {
		t.Fatal(err)
	}

	c, err := orphan.Find(ctx, js, now, staleAfter)
	if err != nil {
		t.Fatal(err)
	}
	if c.Uploads != 2 || !slices.Equal(c.Keys, []string{"uploads/lost-converting", "uploads/lost-queued"}) || !c.Since.Equal(older) {
		t.Errorf("Find = %+v; want the two lost uploads, oldest first, since %s", c, older)
	}
}

func TestFindOnAnEmptyStatusBucketCountsNothing(t *testing.T) {
	ctx := context.Background()
	_, js := natstest.Start(t)
	if _, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: events.StatusBucket}); err != nil {
		t.Fatal(err)
	}
	c, err := orphan.Find(ctx, js, time.Now(), time.Minute)
	if err != nil || c.Uploads != 0 {
		t.Fatalf("Find = %+v, %v; want nothing", c, err)
	}
}
