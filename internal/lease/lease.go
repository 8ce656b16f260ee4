// Package lease lets one replica among many do a job that only one may do
// at a time, with nothing but a JetStream key-value bucket: no clocks that
// must agree, no coordinator. ingest's periodic reconcile takes a lease
// once per period; notify's stall watchdog holds one, renewing it while it
// lives and handing it back when it stops.
//
// A lease is a key. Create succeeds only when the key does not exist,
// atomically across replicas, so exactly one replica takes a free lease;
// the bucket's TTL (its stream's MaxAge) removes a key nobody renews, so a
// holder that dies passes the lease on by itself. A holder renews with an
// Update that names the revision it holds, so a replica that lost the
// lease unawares can never take it back by renewing. A bucket was chosen
// over a stream with MaxMsgs=1 because Create and Update give
// compare-and-set for free, and because an operator can read the current
// holder with `nats kv get`.
package lease

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/internal/setup"
)

// Bucket is a bucket of leases. TTL is how long a lease nobody renews
// lives: one period for a lease taken once per period, a few renewals
// for a lease that is held.
type Bucket struct {
	Name        string
	Description string
	TTL         time.Duration
	Replicas    int
}

// KeyValueConfig is the bucket as JetStream creates it; `imagepipe setup`
// provisions it from this too.
func (b Bucket) KeyValueConfig() jetstream.KeyValueConfig {
	return jetstream.KeyValueConfig{
		Bucket:      b.Name,
		Description: b.Description,
		History:     1,
		TTL:         b.TTL,
		Storage:     jetstream.FileStorage,
		Replicas:    max(b.Replicas, 1),
	}
}

// Lease is one replica's hand on one key of a bucket. It is not safe for
// concurrent use: one goroutine takes, holds and releases it.
type Lease struct {
	kv     jetstream.KeyValue
	key    string
	name   string
	holder []byte
	log    *slog.Logger

	rev uint64 // the revision this replica holds, or 0
}

// Open opens the bucket, creating it if it does not exist yet (never
// changing one that does: setup.KV), and returns this replica's lease on
// key. name says in logs and errors what the lease is for.
func Open(ctx context.Context, js jetstream.JetStream, b Bucket, key, name string, log *slog.Logger) (*Lease, error) {
	kv, err := setup.KV(ctx, js, b.KeyValueConfig())
	if err != nil {
		return nil, fmt.Errorf("%s lease: %w", name, err)
	}
	return New(kv, key, name, log), nil
}

// New is a lease on key of an open bucket, held, when it is, by a holder
// named after this host and unique to this lease, so that two leases in
// one process tell each other apart.
func New(kv jetstream.KeyValue, key, name string, log *slog.Logger) *Lease {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Lease{kv: kv, key: key, name: name, holder: []byte(holderName()), log: log}
}

func holderName() string {
	host, _ := os.Hostname()
	var nonce [6]byte
	_, _ = rand.Read(nonce[:])
	return host + "/" + hex.EncodeToString(nonce[:])
}

// Holder is the name this replica holds the lease under.
func (l *Lease) Holder() string { return string(l.holder) }

// Acquire takes the lease if nobody holds it, this replica included, and
// reports whether it did. It never renews: for a job done once per period,
// where the TTL ends the period and whoever takes the lease first in a
// period does the job.
func (l *Lease) Acquire(ctx context.Context) (bool, error) {
	_, err := l.kv.Create(ctx, l.key, l.holder)
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, jetstream.ErrKeyExists):
		return false, nil
	}
	return false, fmt.Errorf("%s lease: %w", l.name, err)
}

// Hold renews the lease if this replica holds it, else takes it if it is
// free, and reports whether this replica holds it now. Call it more often
// than the TTL. It logs when the lease is taken or lost, and why it could
// not be looked at.
func (l *Lease) Hold(ctx context.Context) bool {
	if l.rev != 0 {
		rev, err := l.kv.Update(ctx, l.key, l.holder, l.rev)
		if err == nil {
			l.rev = rev
			return true
		}
		l.log.Warn(l.name+" lease lost", "err", err.Error())
		l.rev = 0
	}
	rev, err := l.kv.Create(ctx, l.key, l.holder)
	if errors.Is(err, jetstream.ErrKeyExists) {
		// A renewal whose answer was lost may still have landed; the lease
		// is then ours at a revision we did not see.
		if e, gerr := l.kv.Get(ctx, l.key); gerr == nil && string(e.Value()) == string(l.holder) {
			l.rev = e.Revision()
			return true
		}
		return false
	}
	if err != nil {
		if ctx.Err() == nil {
			l.log.Warn(l.name+" lease unavailable", "err", err.Error())
		}
		return false
	}
	l.rev = rev
	l.log.Info(l.name+" lease acquired", "holder", string(l.holder))
	return true
}

// Release hands back a lease this replica holds, so that another need not
// wait for it to expire. Should that fail, the lease expires all the same.
func (l *Lease) Release(ctx context.Context) {
	if l.rev == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := l.kv.Delete(ctx, l.key, jetstream.LastRevision(l.rev)); err != nil {
		l.log.Debug(l.name+" lease not released; it will expire", "err", err.Error())
	}
	l.rev = 0
}
