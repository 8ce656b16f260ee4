package ingest

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/orphan"
	"github.com/imagepipe/imagepipe/internal/status"
)

// JobQueue is the convert job queue as reconcile sees it.
type JobQueue interface {
	// JobIDs returns the job id of every message the queue holds: waiting,
	// backing off, or delivered to a replica and not yet acknowledged.
	JobIDs(ctx context.Context) (map[string]bool, error)
	// Requeue publishes a job under its event id as deduplication id and
	// reports whether the stream dropped it as a duplicate.
	Requeue(ctx context.Context, msg events.Message) (duplicate bool, err error)
}

// staleMargin is added to the longest silence a live job can show, so
// that a clock skew or a slow status write is never taken for a loss.
const staleMargin = time.Minute

// StaleBound is how long a non-final status may stand still before
// reconcile looks for its job, given convert's AckWait and redelivery
// back-off. A live job is silent for at most that long: a replica that
// dies mid-job is noticed after AckWait and its job is redelivered (twice
// AckWait allows for a redelivery that itself stalls before its first
// status write), and a job that failed for a while waits its back-off in
// QUEUED. Either way its message is still in the queue, which reconcile
// checks too; the bound keeps it from acting on a moment, such as a job
// whose status is written and whose publish is on its way.
func StaleBound(ackWait time.Duration, backoff []time.Duration) time.Duration {
	b := 2 * ackWait
	for _, d := range backoff {
		b = max(b, d)
	}
	return b + staleMargin
}

// stuck is a status that stood still for longer than the bound; its job
// is re-queued if the queue does not hold it.
type stuck struct {
	c        candidate
	identity string
	st       events.Status
}

// stale reports whether st has stood still for longer than staleAfter in
// a state that expects a job behind it (orphan.Stale: the judgement the
// watchdog and `ctl stats` count by too).
func (h *Handler) stale(st events.Status, staleAfter time.Duration) bool {
	return orphan.Stale(st, h.now(), staleAfter)
}

// healStuck re-queues each stuck job the queue no longer holds. The queue
// is read once, after every status in the pass was read, and each status
// is read again before its job is re-queued: a job that finished or moved
// meanwhile has left its mark there, and is left alone.
func (h *Handler) healStuck(ctx context.Context, stuck []stuck, staleAfter time.Duration, res *events.ReconcileResult) error {
	if len(stuck) == 0 {
		return nil
	}
	held, err := h.deps.Jobs.JobIDs(ctx)
	if err != nil {
		return fmt.Errorf("reconcile: read the job queue: %w", err)
	}
	for _, s := range stuck {
		if !orphan.Orphaned(s.st, held, h.now(), staleAfter) {
			continue
		}
		cur, found, err := h.statusOf(ctx, s.c.Bucket, s.c.Key)
		if err != nil {
			return fmt.Errorf("reconcile %s/%s: %w", s.c.Bucket, s.c.Key, err)
		}
		if !found || cur.JobID != s.st.JobID || cur.State != s.st.State || !cur.UpdatedAt.Equal(s.st.UpdatedAt) {
			continue
		}
		// The job may have finished and lost only its last status write:
		// its output then says so, and converting again would be waste.
		restored, err := h.restoreReady(ctx, s.c, s.st.JobID, s.st.Attempt)
		if err != nil {
			return fmt.Errorf("reconcile %s/%s: %w", s.c.Bucket, s.c.Key, err)
		}
		if restored {
			res.Restored++
			res.Keys = appendKey(res.Keys, s.c.Key)
			continue
		}
		requeued, err := h.requeue(ctx, s)
		if err != nil {
			return fmt.Errorf("reconcile %s/%s: %w", s.c.Bucket, s.c.Key, err)
		}
		if requeued {
			res.Requeued++
			res.Keys = appendKey(res.Keys, s.c.Key)
		}
	}
	return nil
}

// requeue publishes a lost job again: the same job id and the same event
// id, so that, were the original still in the queue after all, JetStream's
// duplicate window would drop this copy. QUEUED is written first, as
// ingest does, so a publish that fails leaves a status that the next pass
// finds stuck again. It keeps the record's attempt, the one state write
// the status store accepts over the same job's record; a write it refuses
// means the record moved after all, and nothing is queued.
func (h *Handler) requeue(ctx context.Context, s stuck) (bool, error) {
	msg, job, err := h.lostJob(s)
	if err != nil {
		return false, err
	}
	st := events.Status{Bucket: job.Bucket, Key: job.Key, JobID: job.JobID, State: events.StateQueued,
		Attempt: s.st.Attempt, UpdatedAt: h.now().UTC()}
	switch err := h.deps.Status.Set(ctx, st); {
	case errors.Is(err, status.ErrNotForward):
		return false, nil
	case err != nil:
		return false, err
	}
	dup, err := h.deps.Jobs.Requeue(ctx, msg)
	if err != nil {
		return false, err
	}
	if dup {
		// The stream remembers the id of a message it no longer holds:
		// one lost or deleted within the duplicate window, without a
		// restart that would have rebuilt the window from what is
		// stored. The queue was just read and holds no copy, so one
		// under a second id derived from the first is the only one;
		// a later pass within the window is dropped as its duplicate.
		msg.Event.ID = requeueEventID(msg.Event.ID)
		if dup, err = h.deps.Jobs.Requeue(ctx, msg); err != nil {
			return false, err
		}
	}
	h.log.Info("lost job queued again", "stage", "queued", "job", job.JobID, "bucket", job.Bucket, "key", job.Key,
		"reason", job.Reason, "was", s.st.State, "still_since", s.st.UpdatedAt, "duplicate", dup)
	return true, nil
}

// lostJob rebuilds the job of a stuck status. The version's own job is
// made exactly as ingest made it. A re-convert's job id is random and its
// message gone, so it is rebuilt under that id with what the object
// says; a format the re-convert asked for is not recorded anywhere else,
// and the upload's own choice or convert's default applies.
//
// Either way the job carries the attempts the record has seen, so that
// convert's attempts count on from there and the status, which never
// moves back, follows the new delivery.
func (h *Handler) lostJob(s stuck) (events.Message, events.ConvertJob, error) {
	eventID := s.st.JobID
	job := events.ConvertJob{
		JobID: s.st.JobID, Bucket: s.c.Bucket, Key: s.c.Key, VersionID: s.c.VersionID, ETag: s.c.ETag,
		Size: s.c.Size, NoDedup: true, Reason: ReasonReconcile, QueuedAt: h.now().UTC(),
	}
	if s.st.JobID == events.JobIDFor(s.identity) {
		var err error
		if _, job, err = h.job(s.c, s.identity, ReasonReconcile); err != nil {
			return events.Message{}, job, err
		}
		eventID = s.identity
	}
	job.PriorAttempts = s.st.Attempt
	msg, err := jobMessage(eventID, job)
	return msg, job, err
}

// ReasonReconcile is the reason of every job reconcile queues.
const ReasonReconcile = "reconcile"

var requeueNamespace = uuid.MustParse("5f3e9a72-1c4b-4d8e-b6a0-2e7c9d4f1a38")

func requeueEventID(eventID string) string {
	return uuid.NewSHA1(requeueNamespace, []byte(eventID)).String()
}

// restoreReady writes READY back for an object whose status record is
// lost, or stuck, while the job's output is complete: an output carrying
// the job's id and its sha256 tag (tagged last, so a tag means the upload
// completed). It reports whether it did; converting again is the answer
// in every other case.
func (h *Handler) restoreReady(ctx context.Context, c candidate, jobID string, attempt int) (bool, error) {
	for _, format := range outputFormats(c.Metadata) {
		key := events.OutputKey(h.cfg.OutputPrefix, c.Key, format)
		out, err := h.deps.Storage.Stat(ctx, h.cfg.OutputBucket, key)
		switch {
		case objstore.IsNotFound(err):
			continue
		case err != nil:
			return false, fmt.Errorf("stat output %s/%s: %w", h.cfg.OutputBucket, key, err)
		case out.Metadata[events.MetaJob] != jobID:
			continue
		}
		tags, err := h.deps.Storage.Tags(ctx, h.cfg.OutputBucket, key)
		if err != nil {
			return false, fmt.Errorf("read tags of %s/%s: %w", h.cfg.OutputBucket, key, err)
		}
		if tags[events.TagSHA256] == "" {
			continue
		}
		st := events.Status{
			Bucket: c.Bucket, Key: c.Key, JobID: jobID, State: events.StateReady, Percent: 100,
			InputFormat: out.Metadata[events.MetaInputFormat], OutputBucket: h.cfg.OutputBucket, OutputKey: key,
			Attempt: attempt, UpdatedAt: h.now().UTC(),
		}
		switch err := h.deps.Status.Set(ctx, st); {
		case errors.Is(err, status.ErrNotForward):
			return false, nil // the job itself wrote its end meanwhile
		case err != nil:
			return false, err
		}
		h.log.Info("status restored from its output", "stage", "ready", "job", jobID, "bucket", c.Bucket, "key", c.Key, "output_key", key)
		return true, nil
	}
	return false, nil
}

// outputFormats are the formats whose output key may hold the object's
// output: the one its upload asked for, else either.
func outputFormats(meta map[string]string) []string {
	if f := meta[events.MetaFormat]; f == "raw" || f == "qcow2" {
		return []string{f}
	}
	return []string{"raw", "qcow2"}
}

func appendKey(keys []string, key string) []string {
	if len(keys) < maxReportedKeys {
		keys = append(keys, key)
	}
	return keys
}
