package ingest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"iter"
	"log/slog"
	"time"

	"github.com/google/uuid"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/status"
)

// StatusStore reads and records images' states.
type StatusStore interface {
	Queue(ctx context.Context, st events.Status) error
	Set(ctx context.Context, st events.Status) error
	Get(ctx context.Context, bucket, key string) (events.Status, error)
}

// Storage is the part of object storage ingest uses beyond notifications:
// a stat when a notification leaves a doubt, listings for reconcile, and
// streaming uploads for import.
type Storage interface {
	Stat(ctx context.Context, bucket, key string) (objstore.Object, error)
	List(ctx context.Context, bucket, prefix string) iter.Seq2[objstore.Object, error]
	// Put streams r into bucket/key. size is -1 when unknown, and then
	// partSize bounds the memory the upload buffers. The object appears
	// only when r has been read to its end without an error.
	PutStream(ctx context.Context, bucket, key string, r io.Reader, size int64, partSize uint64, meta map[string]string, ifAbsent bool) error
	// Tags reads an object's tags; reconcile reads an output's sha256.
	Tags(ctx context.Context, bucket, key string) (map[string]string, error)
}

// Publisher sends events to their streams with the event id as
// Nats-Msg-Id. Notifications make jobs through the runtime; reconcile,
// re-convert and import publish their own.
type Publisher func(ctx context.Context, msgs ...events.Message) error

// Deps are the handler's collaborators. Status is required; Storage and
// Publish are needed by everything beyond plain notifications; without
// Jobs, reconcile does not look for lost jobs.
type Deps struct {
	Status  StatusStore
	Storage Storage
	Publish Publisher
	Jobs    JobQueue
}

// Handler is the ingest function: it turns notifications into jobs, and
// answers re-convert, reconcile and import requests under the same rules.
type Handler struct {
	cfg   Config
	deps  Deps
	log   *slog.Logger
	now   func() time.Time
	stats counters

	imports *importer
}

// New returns a handler.
func New(cfg Config, deps Deps, log *slog.Logger) *Handler {
	return &Handler{cfg: cfg.normalized(), deps: deps, log: log, now: time.Now, stats: newCounters(), imports: newImporter(cfg)}
}

// Stats counts the outcome of every notification record since the handler
// started, by reason, and the objects reconcile queued or refused. A
// redelivered notification counts again.
func (h *Handler) Stats() map[string]uint64 { return h.stats.snapshot() }

// Handle parses one notification and returns a job for each record that
// deserves one, and a failure event for each record refused. A
// notification that cannot be parsed is refused for good: redelivering it
// would only fail again.
func (h *Handler) Handle(ctx context.Context, data []byte) ([]events.Message, error) {
	n, err := events.ParseNotification(data)
	if err != nil {
		h.stats.add(ReasonMalformed)
		h.log.Warn("notification refused", "stage", "intake", "reason", ReasonMalformed, "payload_bytes", len(data), "err", err)
		return nil, failure.Permanent(events.PhaseIntake, fmt.Errorf("%w (payload of %d bytes)", err, len(data)), "")
	}
	var out []events.Message
	for _, r := range n.Records {
		log := h.log.With("bucket", r.Bucket, "key", r.Key, "event", r.EventName)
		c := candidate{Bucket: r.Bucket, Key: r.Key, Size: r.Size, ETag: r.ETag, VersionID: r.VersionID, Metadata: r.UserMetadata}
		v := verdict{skip: eventReason(r.EventName)}
		if v.skip == "" {
			v, err = h.judgeStored(ctx, c)
			if err != nil {
				return nil, err
			}
		}
		msgs, err := h.act(ctx, c, v, "upload", log.With("payload_bytes", len(data)))
		if err != nil {
			return nil, err
		}
		out = append(out, msgs...)
	}
	return out, nil
}

// judgeStored judges a candidate and, when the output bucket is the input
// bucket and the source did not say what metadata the object has, reads it:
// an output must never be taken for an upload.
func (h *Handler) judgeStored(ctx context.Context, c candidate) (verdict, error) {
	v := h.judge(c)
	if v.skip != "" || c.Metadata != nil || h.cfg.InputBucket != h.cfg.OutputBucket || h.deps.Storage == nil {
		return v, nil
	}
	obj, err := h.deps.Storage.Stat(ctx, c.Bucket, c.Key)
	switch {
	case objstore.IsNotFound(err):
		// Deleted already: there is nothing to convert or to report.
		return verdict{skip: ReasonGone}, nil
	case err != nil:
		return verdict{}, failure.Retryable(events.PhaseIntake, err, "")
	}
	c.Metadata = obj.Metadata
	if c.Metadata == nil {
		c.Metadata = map[string]string{}
	}
	return h.judge(c), nil
}

// act turns a verdict into messages: nothing for a skip, a failure event
// and a FAILED state for a refusal, a job and a QUEUED state otherwise.
func (h *Handler) act(ctx context.Context, c candidate, v verdict, reason string, log *slog.Logger) ([]events.Message, error) {
	identity := events.ObjectIdentity(c.Bucket, c.Key, c.VersionID, c.ETag)
	switch {
	case v.skip != "":
		h.stats.add(v.skip)
		level := slog.LevelInfo
		if v.skip == ReasonUnknownEvent || v.skip == ReasonOtherBucket {
			// Not routine: a misconfigured bucket notification.
			level = slog.LevelWarn
		}
		log.Log(ctx, level, "notification skipped", "stage", "intake", "reason", v.skip)
		return nil, nil
	case v.refuse != nil:
		msg, err := h.refuse(ctx, c, events.JobIDFor(identity), refusalEventID(identity), v.refuse)
		if err != nil {
			return nil, err
		}
		h.stats.add(v.refuse.Rule)
		log.Warn("upload refused", "stage", "intake", "reason", v.refuse.Rule, "err", v.refuse.Err)
		return []events.Message{msg}, nil
	}
	msg, job, err := h.job(c, identity, reason)
	if err != nil {
		return nil, err
	}
	// Write order, status then job: QUEUED is recorded here, the job is
	// published by the runtime once this returns, and the notification is
	// acknowledged after that. A publish that fails leaves the
	// notification to be redelivered (Queue is a no-op for the same job);
	// a publish acknowledged and then lost leaves QUEUED standing still
	// with no job in the queue, which reconcile finds and queues again
	// under the same id. The other order could let a replica's first
	// state land before QUEUED, and a lost status write would leave a job
	// running under another job's record.
	if err := h.deps.Status.Queue(ctx, events.Status{Bucket: job.Bucket, Key: job.Key, JobID: job.JobID, UpdatedAt: h.now().UTC()}); err != nil {
		return nil, failure.Retryable(events.PhaseIntake, err, "")
	}
	h.stats.add(ReasonQueued)
	log.Info("job queued", "stage", "queued", "job", job.JobID, "size", job.Size, "reason", reason)
	return []events.Message{msg}, nil
}

// job makes the convert job of one version of one object. Its event id is
// the object's identity, so JetStream drops a repeat within its duplicate
// window, whichever path (notification or reconcile) queued it first; and
// its job id derives from the identity, so a repeat after the window names
// the same job.
func (h *Handler) job(c candidate, identity, reason string) (events.Message, events.ConvertJob, error) {
	job := events.ConvertJob{
		JobID:     events.JobIDFor(identity),
		Bucket:    c.Bucket,
		Key:       c.Key,
		VersionID: c.VersionID,
		ETag:      c.ETag,
		Size:      c.Size,
		Reason:    reason,
		QueuedAt:  h.now().UTC(),
	}
	msg, err := jobMessage(identity, job)
	return msg, job, err
}

func jobMessage(eventID string, job events.ConvertJob) (events.Message, error) {
	ev, err := events.New(eventID, events.TypeConvertJob, events.SourceIngest, job.Key, job.QueuedAt, job)
	if err != nil {
		return events.Message{}, failure.Permanent(events.PhaseIntake, err, "")
	}
	return events.Message{Subject: events.SubjectConvertJob, Event: ev}, nil
}

var refusalNamespace = uuid.MustParse("0b6f3c1e-7d5a-4f0e-9a2c-5e8d1b4c7a93")

// refusalEventID is deterministic, so a repeated notification of a refused
// upload republishes the same failure and JetStream drops the copy.
func refusalEventID(identity string) string {
	return uuid.NewSHA1(refusalNamespace, []byte(identity)).String()
}

// refuse records a refusal as FAILED and returns its failure event.
func (h *Handler) refuse(ctx context.Context, c candidate, jobID, eventID string, fe *failure.Error) (events.Message, error) {
	data := events.Failed{
		JobID: jobID, InputBucket: c.Bucket, InputKey: c.Key,
		Phase: fe.Phase, Message: fe.Err.Error(), Suggestion: fe.Suggestion, Rule: fe.Rule,
		Attempt: 1, WillRetry: false,
	}
	st := events.Status{
		Bucket: c.Bucket, Key: c.Key, JobID: jobID, State: events.StateFailed, Phase: fe.Phase,
		Message: data.Message, Suggestion: fe.Suggestion, Rule: fe.Rule, Attempt: 1, UpdatedAt: h.now().UTC(),
	}
	// A repeated notification finds its refusal recorded already.
	//
	// Write order, status then failure event (published by the runtime):
	// FAILED is final and complete by itself, so an event lost after it
	// costs a notification, never the upload's end; and a status write
	// that fails stops before the event, so the notification is
	// redelivered and both are written then (the event under the same id).
	if err := h.deps.Status.Set(ctx, st); err != nil && !errors.Is(err, status.ErrNotForward) {
		return events.Message{}, failure.Retryable(events.PhaseIntake, err, "")
	}
	ev, err := events.New(eventID, events.TypeFailed, events.SourceIngest, c.Key, h.now(), data)
	if err != nil {
		return events.Message{}, failure.Permanent(events.PhaseIntake, err, "")
	}
	return events.Message{Subject: events.SubjectFailed, Event: ev}, nil
}

// statusOf returns an object's status record; found is false when it has
// none.
func (h *Handler) statusOf(ctx context.Context, bucket, key string) (st events.Status, found bool, err error) {
	st, err = h.deps.Status.Get(ctx, bucket, key)
	switch {
	case errors.Is(err, status.ErrNotFound):
		return events.Status{}, false, nil
	case err != nil:
		return events.Status{}, false, err
	}
	return st, true, nil
}
