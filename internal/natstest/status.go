package natstest

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
)

// StatusBucket is the bucket of upload status records on js, five
// revisions a key as the pipeline keeps it.
func StatusBucket(t testing.TB, js jetstream.JetStream) jetstream.KeyValue {
	t.Helper()
	kv, err := js.CreateKeyValue(context.Background(), jetstream.KeyValueConfig{Bucket: events.StatusBucket, History: 5})
	if err != nil {
		t.Fatal(err)
	}
	return kv
}

// PutStatus writes st as its upload's record, as a function would have.
func PutStatus(t testing.TB, kv jetstream.KeyValue, st events.Status) {
	t.Helper()
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(context.Background(), events.StatusKey(st.Bucket, st.Key), b); err != nil {
		t.Fatal(err)
	}
}
