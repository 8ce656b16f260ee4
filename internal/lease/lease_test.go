package lease_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/internal/lease"
	"github.com/imagepipe/imagepipe/internal/natstest"
)

// replicas starts a JetStream server for the test and returns how each
// replica opens its own lease on one key of a bucket whose leases live ttl
// unless renewed.
func replicas(t *testing.T, ttl time.Duration) (open func() *lease.Lease, js jetstream.JetStream) {
	t.Helper()
	_, js = natstest.Start(t)
	b := lease.Bucket{Name: "test_lease", Description: "a lease under test", TTL: ttl}
	return func() *lease.Lease {
		t.Helper()
		l, err := lease.Open(context.Background(), js, b, "k", "test", nil)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}, js
}

// eventually polls ok until it holds, failing the test after a deadline
// generous enough for a loaded machine.
func eventually(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestHeldLeaseHasOneHolderUntilItIsHandedBack(t *testing.T) {
	ctx := context.Background()
	open, _ := replicas(t, time.Hour)
	a, b := open(), open()
	if a.Holder() == b.Holder() {
		t.Fatalf("two leases of one process share the holder name %q", a.Holder())
	}
	if !a.Hold(ctx) {
		t.Fatal("a free lease was not taken")
	}
	if b.Hold(ctx) {
		t.Fatal("a second replica took a lease that is held")
	}
	if !a.Hold(ctx) {
		t.Fatal("the holder could not renew its lease")
	}
	if b.Hold(ctx) {
		t.Fatal("a second replica took a lease its holder renewed")
	}
	a.Release(ctx)
	if !b.Hold(ctx) {
		t.Fatal("a lease handed back was not free for the next replica")
	}
	if a.Hold(ctx) {
		t.Fatal("two replicas hold the lease")
	}
}

func TestHeldLeasePassesOnWhenItsHolderStopsRenewing(t *testing.T) {
	ctx := context.Background()
	open, _ := replicas(t, time.Second)
	a, b := open(), open()
	if !a.Hold(ctx) {
		t.Fatal("a free lease was not taken")
	}
	// a dies: it never renews nor hands the lease back.
	eventually(t, "the lease to pass on after its TTL", func() bool { return b.Hold(ctx) })
	if a.Hold(ctx) {
		t.Fatal("the replica whose lease expired still holds it beside its successor")
	}
	if !b.Hold(ctx) {
		t.Fatal("the new holder lost the lease to the old one")
	}
}

func TestAcquiredLeaseGoesToOneReplicaPerPeriod(t *testing.T) {
	ctx := context.Background()
	open, _ := replicas(t, time.Second)
	a, b := open(), open()
	ok, err := a.Acquire(ctx)
	if err != nil || !ok {
		t.Fatalf("first acquire of a free lease = %v, %v", ok, err)
	}
	// Nobody takes it again within the period, its taker included: a
	// period's job runs once.
	for _, l := range []*lease.Lease{b, a} {
		if ok, err := l.Acquire(ctx); ok || err != nil {
			t.Errorf("second acquire in the same period = %v, %v", ok, err)
		}
	}
	eventually(t, "the next period's lease", func() bool {
		ok, err := b.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	})
	if ok, _ := a.Acquire(ctx); ok {
		t.Error("two replicas took the lease in one period")
	}
}

func TestOpenLeavesAnExistingBucketAsItIs(t *testing.T) {
	ctx := context.Background()
	open, js := replicas(t, time.Hour)
	open()
	// A replica started with other settings must not undo setup's.
	if _, err := lease.Open(ctx, js, lease.Bucket{Name: "test_lease", TTL: time.Minute}, "k", "test", nil); err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, "test_lease")
	if err != nil {
		t.Fatal(err)
	}
	st, err := kv.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.TTL() != time.Hour {
		t.Errorf("bucket TTL = %s after a second open with another TTL, want the first one's 1h", st.TTL())
	}
}
