// Package setuptest starts, for a function's tests, what one of its
// replicas talks to on the real parts: JetStream with the product's
// streams and status bucket, and MinIO with an input and an output bucket
// of the test's own.
//
// It lives apart from internal/natstest and test/stack because it uses
// internal/setup, whose own tests use those two.
package setuptest

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/internal/natstest"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/setup"
	"github.com/imagepipe/imagepipe/test/stack"
)

// Stack is a replica's world: a JetStream server of the test's own with
// the product's streams and status bucket, and buckets of the test's own
// on ms.
type Stack struct {
	JS      jetstream.JetStream
	KV      jetstream.KeyValue // the status bucket
	Store   *objstore.Store
	In, Out string // input and output buckets
}

// Start makes a Stack on ms, the package's MinIO or one of the test's own.
func Start(t testing.TB, ms *stack.MinIO) *Stack {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(2*time.Minute))
	defer cancel()
	_, js := natstest.Start(t)
	if err := setup.Streams(ctx, js, setup.StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	kv, err := setup.StatusKV(ctx, js, 1)
	if err != nil {
		t.Fatal(err)
	}
	store, err := objstore.New(objstore.Config{Endpoint: ms.Endpoint, AccessKey: ms.AccessKey, SecretKey: ms.SecretKey})
	if err != nil {
		t.Fatal(err)
	}
	// Buckets named for this run, so a repeated run (-count) finds none of
	// the last one's objects.
	run := strconv.FormatInt(time.Now().UnixNano(), 36)
	s := &Stack{JS: js, KV: kv, Store: store, In: "uploads-" + run, Out: "images-" + run}
	for _, b := range []string{s.In, s.Out} {
		if err := store.Client().MakeBucket(ctx, b, minio.MakeBucketOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	return s
}
