package ingest

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/google/uuid"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/objstore"
)

// RequestError is a request that can never succeed as asked; its message
// is meant for the person who asked.
type RequestError struct{ Msg string }

func (e *RequestError) Error() string { return e.Msg }

func requestErrorf(format string, args ...any) error {
	return &RequestError{Msg: fmt.Sprintf(format, args...)}
}

// IsRequestError reports whether err is the asker's to fix.
func IsRequestError(err error) bool {
	var re *RequestError
	return errors.As(err, &re)
}

// Reconvert queues a new job for an existing object, bypassing content
// de-duplication: an operator who asks for a conversion gets one. The job
// id is fresh, so the job is neither dropped as a repeat nor mistaken by
// convert for an earlier delivery that already uploaded its output.
func (h *Handler) Reconvert(ctx context.Context, req events.ReconvertRequest) (string, error) {
	if h.deps.Storage == nil || h.deps.Publish == nil {
		return "", errors.New("reconvert: no storage or publisher configured")
	}
	format := strings.ToLower(strings.TrimSpace(req.Format))
	switch {
	case req.Key == "":
		return "", requestErrorf("reconvert: no key given")
	case req.Bucket != h.cfg.InputBucket:
		return "", requestErrorf("reconvert: %q is not the input bucket; imagepipe converts objects in %q only", req.Bucket, h.cfg.InputBucket)
	case format != "" && format != "raw" && format != "qcow2":
		return "", requestErrorf("reconvert: output format %q is not raw or qcow2", req.Format)
	}
	obj, err := h.deps.Storage.Stat(ctx, req.Bucket, req.Key)
	switch {
	case objstore.IsNotFound(err):
		return "", requestErrorf("reconvert: no object %s/%s exists", req.Bucket, req.Key)
	case err != nil:
		return "", fmt.Errorf("reconvert %s/%s: %w", req.Bucket, req.Key, err)
	}
	// The rules that keep bad input out still hold; the ones that choose
	// among good input (prefixes, extensions) yield to an explicit ask.
	switch {
	case strings.HasPrefix(obj.Key, events.ErrorPrefix):
		return "", requestErrorf("reconvert: %s/%s is an error report, not an image", obj.Bucket, obj.Key)
	case h.underOutputPrefix(obj.Key):
		return "", requestErrorf("reconvert: %s/%s is under IMAGEPIPE_OUTPUT_PREFIX %q, where outputs are written, not an upload", obj.Bucket, obj.Key, h.cfg.OutputPrefix)
	case events.HasReservedSegment(obj.Key):
		return "", requestErrorf("reconvert: %s/%s: %v", obj.Bucket, obj.Key, reservedKey().Err)
	case isOutput(obj.Metadata):
		return "", requestErrorf("reconvert: %s/%s is an imagepipe output, not an upload", obj.Bucket, obj.Key)
	case obj.Size == 0:
		return "", requestErrorf("reconvert: %s/%s is empty", obj.Bucket, obj.Key)
	case obj.Size > h.cfg.MaxInputSize:
		return "", requestErrorf("reconvert: %s/%s: %v", obj.Bucket, obj.Key, h.tooLarge(obj.Size).Err)
	}
	if err := h.unsafeKeyUnderPrefix(obj.Key); err != nil {
		return "", requestErrorf("reconvert: %s/%s: %v", obj.Bucket, obj.Key, err)
	}

	job := events.ConvertJob{
		JobID:        uuid.NewString(),
		Bucket:       obj.Bucket,
		Key:          obj.Key,
		VersionID:    obj.VersionID,
		ETag:         obj.ETag,
		Size:         obj.Size,
		OutputFormat: format,
		NoDedup:      true,
		Reason:       "reconvert",
		QueuedAt:     h.now().UTC(),
	}
	msg, err := jobMessage(job.JobID, job)
	if err != nil {
		return "", err
	}
	prev, hadPrev, err := h.statusOf(ctx, job.Bucket, job.Key)
	if err != nil {
		return "", fmt.Errorf("reconvert %s/%s: %w", job.Bucket, job.Key, err)
	}
	// QUEUED before the job exists: once published, convert may move it
	// on at once, and a later QUEUED would overwrite its progress. Write
	// order, status then job: a publish acknowledged and then lost leaves
	// QUEUED of this job id with no job in the queue, which reconcile
	// queues again under the same id (see lostJob).
	if err := h.deps.Status.Queue(ctx, events.Status{Bucket: job.Bucket, Key: job.Key, JobID: job.JobID, UpdatedAt: h.now().UTC()}); err != nil {
		return "", fmt.Errorf("reconvert %s/%s: %w", job.Bucket, job.Key, err)
	}
	if err := h.deps.Publish(ctx, msg); err != nil {
		if hadPrev {
			if serr := h.deps.Status.Set(ctx, prev); serr != nil {
				h.log.Warn("status not restored after a failed re-convert", "bucket", job.Bucket, "key", job.Key, "err", serr)
			}
		}
		return "", fmt.Errorf("reconvert %s/%s: %w", job.Bucket, job.Key, err)
	}
	h.log.Info("job queued", "stage", "queued", "job", job.JobID, "bucket", job.Bucket, "key", job.Key, "reason", job.Reason, "format", format)
	return job.JobID, nil
}
