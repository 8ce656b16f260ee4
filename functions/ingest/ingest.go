package ingest

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
)

// Config is the ingest function's settings.
type Config struct {
	InputBucket  string `env:"IMAGEPIPE_INPUT_BUCKET" envDefault:"uploads"`
	OutputBucket string `env:"IMAGEPIPE_OUTPUT_BUCKET" envDefault:"images"`
}

// Source is the CloudEvents source of the jobs ingest makes.
const Source = "/imagepipe/ingest"

// OutputMarker is the user metadata key every converted image carries, so
// that ingest never feeds an output back in, whatever the bucket layout.
const OutputMarker = "imagepipe-output"

// ErrorPrefix holds failure reports in the input bucket; never inputs.
const ErrorPrefix = "errors/"

// StatusWriter records that a job is queued.
type StatusWriter interface {
	Queue(ctx context.Context, st events.Status) error
}

// Handler turns notifications into jobs.
type Handler struct {
	cfg    Config
	status StatusWriter
	log    *slog.Logger
	now    func() time.Time
}

// New returns a handler; status may be nil.
func New(cfg Config, status StatusWriter, log *slog.Logger) *Handler {
	return &Handler{cfg: cfg, status: status, log: log, now: time.Now}
}

// createEvents start a job. PutTagging, PutRetention and the like are also
// s3:ObjectCreated:* but change no content: tagging an image must not
// convert it again.
var createEvents = map[string]bool{
	"s3:ObjectCreated:Put":                     true,
	"s3:ObjectCreated:Post":                    true,
	"s3:ObjectCreated:Copy":                    true,
	"s3:ObjectCreated:CompleteMultipartUpload": true,
}

// Handle parses one notification and returns a job for each record that
// deserves one. A notification that cannot be parsed is refused for good:
// redelivering it would only fail again.
func (h *Handler) Handle(ctx context.Context, data []byte) ([]events.Message, error) {
	n, err := events.ParseNotification(data)
	if err != nil {
		return nil, failure.Permanent(events.PhaseIntake, fmt.Errorf("%w (payload of %d bytes)", err, len(data)), "")
	}
	var out []events.Message
	for _, r := range n.Records {
		log := h.log.With("bucket", r.Bucket, "key", r.Key, "event", r.EventName)
		if reason := h.skip(r); reason != "" {
			log.Info("notification skipped", "stage", "intake", "reason", reason)
			continue
		}
		msg, job, err := h.job(r)
		if err != nil {
			return nil, err
		}
		if h.status != nil {
			err := h.status.Queue(ctx, events.Status{Bucket: job.Bucket, Key: job.Key, JobID: job.JobID, UpdatedAt: h.now().UTC()})
			if err != nil {
				return nil, failure.Retryable(events.PhaseIntake, err, "")
			}
		}
		log.Info("job queued", "stage", "queued", "job", job.JobID, "size", job.Size)
		out = append(out, msg)
	}
	return out, nil
}

// skip says why a record makes no job, or "" if it makes one.
func (h *Handler) skip(r events.Record) string {
	switch {
	case r.Bucket != h.cfg.InputBucket:
		return "not the input bucket"
	case !createEvents[r.EventName]:
		return "not an upload"
	case strings.HasSuffix(r.Key, "/"):
		return "folder marker"
	case r.Size == 0:
		return "empty object"
	case strings.HasPrefix(r.Key, ErrorPrefix):
		return "error report"
	case isOutput(r.UserMetadata):
		return "an imagepipe output"
	}
	return ""
}

func isOutput(meta map[string]string) bool {
	for k := range meta {
		if strings.EqualFold(strings.TrimPrefix(strings.ToLower(k), "x-amz-meta-"), OutputMarker) {
			return true
		}
	}
	return false
}

func (h *Handler) job(r events.Record) (events.Message, events.ConvertJob, error) {
	identity := events.ObjectIdentity(r.Bucket, r.Key, r.VersionID, r.ETag)
	job := events.ConvertJob{
		JobID:     events.JobIDFor(identity),
		Bucket:    r.Bucket,
		Key:       r.Key,
		VersionID: r.VersionID,
		ETag:      r.ETag,
		Size:      r.Size,
		Reason:    "upload",
		QueuedAt:  h.now().UTC(),
	}
	// The event id is the object's identity: JetStream drops a repeated
	// notification within its duplicate window by it.
	ev, err := events.New(identity, events.TypeConvertJob, Source, r.Key, job.QueuedAt, job)
	if err != nil {
		return events.Message{}, job, failure.Permanent(events.PhaseIntake, err, "")
	}
	return events.Message{Subject: events.SubjectConvertJob, Event: ev}, job, nil
}
