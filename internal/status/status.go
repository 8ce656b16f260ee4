// Package status keeps each image's current state in the JetStream
// key-value bucket and publishes live progress, so `imagepipe status` and
// `imagepipe watch` can show where every upload is.
//
// Every write is a compare-and-set on the record's revision, and only a
// forward transition is written (see Forward): a job delivered twice, for
// instance because its ack was lost to a NATS leader change, cannot move an
// image back, nor report it READY a second time.
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

// writeTimeout bounds one status write, its retries included.
const writeTimeout = 10 * time.Second

// ErrNotFound means no record exists for the object.
var ErrNotFound = errors.New("no status record")

// ErrNotForward means the record already holds this job at or past the
// state written, so the write was dropped: another delivery of the same
// job got there first. Callers treat it as done, not as a failure.
var ErrNotForward = errors.New("status already at or past this state")

// Store reads and writes status records and publishes progress.
type Store struct {
	kv jetstream.KeyValue
	nc *nats.Conn
}

// New returns a store on the status bucket; nc may be nil when no progress
// is published.
func New(kv jetstream.KeyValue, nc *nats.Conn) *Store { return &Store{kv: kv, nc: nc} }

// Set writes the object's record if it moves the image forward (Forward);
// otherwise it writes nothing and returns an error wrapping ErrNotForward.
func (s *Store) Set(ctx context.Context, st events.Status) error {
	return s.write(ctx, st, Forward)
}

// Queue records a newly queued job unless that same job is already
// recorded: a repeated notification must not turn READY back into QUEUED,
// nor a running job back into waiting.
func (s *Store) Queue(ctx context.Context, st events.Status) error {
	st.State = events.StateQueued
	err := s.write(ctx, st, func(cur, next events.Status) bool { return cur.JobID != next.JobID })
	if errors.Is(err, ErrNotForward) {
		return nil
	}
	return err
}

// rank orders the states of one job's sequence. The terminal states share
// the last rank: a job ends once.
func rank(s events.State) int {
	switch s {
	case events.StateUploaded:
		return 1
	case events.StateQueued:
		return 2
	case events.StateDownloading:
		return 3
	case events.StateInspecting:
		return 4
	case events.StateConverting:
		return 5
	case events.StateUploading:
		return 6
	case events.StateReady, events.StateFailed, events.StateDuplicate, events.StateCancelled:
		return 7
	}
	return 0
}

// Forward reports whether next may replace cur. The order of one job is
// UPLOADED → QUEUED → DOWNLOADING → INSPECTING → CONVERTING → UPLOADING →
// READY, FAILED, DUPLICATE or CANCELLED, and:
//
//   - another job id (a newer version of the upload, or a reconvert)
//     starts a new sequence, except over a record another job finished:
//     that is replaced only by a job not yet delivered (QUEUED or an
//     import's UPLOADED, attempt 0) or by intake's refusal. A delivery
//     still at work on an older job (superseded by a newer version that
//     finished first) would otherwise hide the newer READY, and the
//     newer job's READY would be written again when the older one hands
//     the record back;
//   - a job that ended never moves again, so a second READY is dropped;
//   - a later delivery of the job (a higher attempt) takes the record
//     over, and an earlier one that is still running can no longer move it;
//   - within one delivery, a retry returns to QUEUED, progress repeats a
//     state (DOWNLOADING, CONVERTING, UPLOADING), and CONVERTING and
//     UPLOADING alternate while an output streams or an appliance's disks
//     take turns.
func Forward(cur, next events.Status) bool {
	switch {
	case cur.JobID != next.JobID:
		return !cur.State.Terminal() || notDelivered(next) || next.Phase == events.PhaseIntake
	case cur.State.Terminal():
		return false
	case next.Attempt != cur.Attempt:
		return next.Attempt > cur.Attempt
	case next.State == events.StateQueued, next.State == cur.State:
		return true
	case producing(next.State) && producing(cur.State):
		return true
	}
	return rank(next.State) > rank(cur.State)
}

// notDelivered is the record of a job no replica has had yet.
func notDelivered(st events.Status) bool {
	return st.Attempt == 0 && (st.State == events.StateQueued || st.State == events.StateUploaded)
}

// producing is a state of making or sending an output.
func producing(s events.State) bool { return s == events.StateConverting || s == events.StateUploading }

// maxSwaps bounds the compare-and-set loop; each lost swap means another
// writer moved the record, and a few in a row mean it keeps moving.
const maxSwaps = 8

// write stores st if allowed says it may replace the record in place,
// compare-and-set on the revision it read: two writers racing both read
// the same revision, and only one of them can swap it.
func (s *Store) write(ctx context.Context, st events.Status, allowed func(cur, next events.Status) bool) error {
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
	key := events.StatusKey(st.Bucket, st.Key)
	for range maxSwaps {
		cur, rev, err := s.read(ctx, key)
		switch {
		case errors.Is(err, ErrNotFound):
			_, err = s.kv.Create(ctx, key, b)
		case err != nil:
			return fmt.Errorf("write status of %s/%s: %w", st.Bucket, st.Key, err)
		case !allowed(cur, st):
			return fmt.Errorf("status of %s/%s is %s (job %s, attempt %d), not moved to %s (job %s, attempt %d): %w",
				st.Bucket, st.Key, cur.State, cur.JobID, cur.Attempt, st.State, st.JobID, st.Attempt, ErrNotForward)
		default:
			_, err = s.kv.Update(ctx, key, b, rev)
		}
		if errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			continue // another writer moved it since it was read: decide again
		}
		if err != nil {
			return fmt.Errorf("write status of %s/%s: %w", st.Bucket, st.Key, err)
		}
		return nil
	}
	return fmt.Errorf("write status of %s/%s: it changed under %d writes in a row", st.Bucket, st.Key, maxSwaps)
}

// read returns the record at key and its revision. A record that cannot be
// decoded counts as any other job's, so a good one replaces it.
func (s *Store) read(ctx context.Context, key string) (events.Status, uint64, error) {
	e, err := s.kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return events.Status{}, 0, ErrNotFound
	}
	if err != nil {
		return events.Status{}, 0, err
	}
	var st events.Status
	_ = json.Unmarshal(e.Value(), &st)
	return st, e.Revision(), nil
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
