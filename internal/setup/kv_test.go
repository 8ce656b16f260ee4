package setup_test

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/internal/setup"
)

func TestKVCreatesAMissingBucketAndNeverChangesAnExistingOne(t *testing.T) {
	js := startJetStream(t)
	want := jetstream.KeyValueConfig{Bucket: "fn_owned", Description: "a function's own", History: 1, TTL: time.Hour}
	kv, err := setup.KV(ctx(t), js, want)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx(t), "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	// A replica started with stale settings opens the bucket as it is.
	stale := want
	stale.TTL, stale.History, stale.Description = time.Minute, 5, "stale"
	again, err := setup.KV(ctx(t), js, stale)
	if err != nil {
		t.Fatal(err)
	}
	if e, err := again.Get(ctx(t), "k"); err != nil || string(e.Value()) != "v" {
		t.Fatalf("the bucket opened again lost its entry: %v", err)
	}
	st, err := again.Status(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if cfg := st.Config(); cfg.TTL != time.Hour || cfg.History != 1 || cfg.Description != "a function's own" {
		t.Errorf("a function's open changed the bucket to %+v", cfg)
	}
	// Setup does change it.
	c, err := setup.ApplyKV(ctx(t), js, stale)
	if err != nil {
		t.Fatal(err)
	}
	if c.Action != setup.Updated {
		t.Errorf("setup after a change: %s", c)
	}
}
