// Package status keeps each image's current state in the JetStream
// key-value bucket and publishes live progress, so `imagepipe status` and
// `imagepipe watch` can show where every upload is.
package status

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
)

// writeTimeout bounds one status write.
const writeTimeout = 10 * time.Second

// ErrNotFound means no record exists for the object.
var ErrNotFound = errors.New("no status record")

// Store reads and writes status records and publishes progress.
type Store struct {
	kv jetstream.KeyValue
	nc *nats.Conn
}

// New returns a store on the status bucket; nc may be nil when no progress
// is published.
func New(kv jetstream.KeyValue, nc *nats.Conn) *Store { return &Store{kv: kv, nc: nc} }

// Set replaces the object's record.
func (s *Store) Set(ctx context.Context, st events.Status) error {
	if st.UpdatedAt.IsZero() {
		st.UpdatedAt = time.Now().UTC()
	}
	b, err := json.Marshal(st)
	if err != nil {
		return fmt.Errorf("encode status: %w", err)
	}
	// A status write is a hint: it must never hold a job for the length of
	// the job's own deadline when an ack is lost to a NATS restart.
	ctx, cancel := context.WithTimeout(ctx, writeTimeout)
	defer cancel()
	if _, err := s.kv.Put(ctx, events.StatusKey(st.Bucket, st.Key), b); err != nil {
		return fmt.Errorf("write status of %s/%s: %w", st.Bucket, st.Key, err)
	}
	return nil
}

// Queue records a newly queued job unless that same job has already moved
// on: a repeated notification must not turn READY back into QUEUED.
func (s *Store) Queue(ctx context.Context, st events.Status) error {
	cur, err := s.Get(ctx, st.Bucket, st.Key)
	switch {
	case errors.Is(err, ErrNotFound):
	case err != nil:
		return err
	case cur.JobID == st.JobID && cur.State != events.StateQueued:
		return nil
	}
	st.State = events.StateQueued
	return s.Set(ctx, st)
}

// Get returns the object's record.
func (s *Store) Get(ctx context.Context, bucket, key string) (events.Status, error) {
	e, err := s.kv.Get(ctx, events.StatusKey(bucket, key))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return events.Status{}, fmt.Errorf("%s/%s: %w", bucket, key, ErrNotFound)
	}
	if err != nil {
		return events.Status{}, fmt.Errorf("read status of %s/%s: %w", bucket, key, err)
	}
	var st events.Status
	if err := json.Unmarshal(e.Value(), &st); err != nil {
		return events.Status{}, fmt.Errorf("decode status of %s/%s: %w", bucket, key, err)
	}
	return st, nil
}

// Progress publishes a progress report on the job's subject. It is a hint
// for watchers: losing one is harmless, so it goes over core NATS.
func (s *Store) Progress(p events.Progress) error {
	if s.nc == nil {
		return nil
	}
	b, err := json.Marshal(p)
	if err != nil {
		return fmt.Errorf("encode progress: %w", err)
	}
	return s.nc.Publish(events.ProgressSubject(p.JobID), b)
}
