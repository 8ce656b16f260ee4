package events

import (
	"crypto/sha256"
	"encoding/hex"
	"time"

	"github.com/google/uuid"
)

// ConvertJob asks convert to turn one object into an image. It travels on
// SubjectConvertJob inside an Event of TypeConvertJob.
type ConvertJob struct {
	JobID     string `json:"job_id"`
	Bucket    string `json:"bucket"`
	Key       string `json:"key"`
	VersionID string `json:"version_id,omitempty"`
	ETag      string `json:"etag,omitempty"`
	Size      int64  `json:"size"`
	// OutputFormat overrides the converter's configured format when set
	// ("raw" or "qcow2").
	OutputFormat string `json:"output_format,omitempty"`
	// NoDedup skips content de-duplication: an operator's re-convert
	// always converts.
	NoDedup bool `json:"no_dedup,omitempty"`
	// PriorAttempts is how many deliveries the job had before it was
	// queued again (by reconcile, after its message was lost): convert
	// counts its attempts on from there, so that the image's status, which
	// only moves forward, keeps following it.
	PriorAttempts int `json:"prior_attempts,omitempty"`
	// Reason says what started the job: "upload", "reconvert", "reconcile",
	// "import".
	Reason   string    `json:"reason"`
	QueuedAt time.Time `json:"queued_at"`
}

// jobNamespace seeds deterministic job ids (UUID v5).
var jobNamespace = uuid.MustParse("6c1f5f8e-9a4e-4a43-9f57-3f1f0c6f2a11")

// ObjectIdentity names one version of one object's content. Two
// notifications for the same upload share it; a new upload to the same key
// has a new ETag and so a new identity.
func ObjectIdentity(bucket, key, versionID, etag string) string {
	h := sha256.New()
	for _, part := range []string{bucket, key, versionID, etag} {
		h.Write([]byte(part))
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil))
}

// JobIDFor derives the job id of an upload from its identity, so a
// notification repeated long after the duplicate window still names the
// same job and its results replace, never add to, the first ones.
func JobIDFor(identity string) string {
	return uuid.NewSHA1(jobNamespace, []byte(identity)).String()
}
