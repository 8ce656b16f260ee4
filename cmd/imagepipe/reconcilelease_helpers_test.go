package main

import (
	"context"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/functions/ingest"
	"github.com/imagepipe/imagepipe/internal/lease"
	"github.com/imagepipe/imagepipe/internal/setup"
)

// kvLease is one replica's reconcile lease.
type kvLease = lease.Lease

// openReconcileLease brings the reconcile lease's bucket to a period of
// every, as `imagepipe setup` does (a running ingest only creates it if
// missing), and opens one more replica's lease on it.
func openReconcileLease(ctx context.Context, js jetstream.JetStream, every time.Duration, replicas int) (*kvLease, error) {
	b := ingest.Config{ReconcileEvery: every}.ReconcileLease(replicas)
	if _, err := setup.ApplyKV(ctx, js, b.KeyValueConfig()); err != nil {
		return nil, err
	}
	return lease.Open(ctx, js, b, ingest.ReconcileLeaseKey, "reconcile", nil)
}
