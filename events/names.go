package events

// Streams and subjects. Changing any of these breaks users' subscriptions.
const (
	StreamS3Events  = "S3_EVENTS"
	SubjectS3Events = "imagepipe.s3.events"

	StreamJobs        = "JOBS"
	SubjectConvertJob = "imagepipe.jobs.convert"

	StreamResults    = "RESULTS"
	SubjectConverted = "imagepipe.results.converted"
	SubjectFailed    = "imagepipe.results.failed"
	SubjectResults   = "imagepipe.results.>"

	SubjectProgressPrefix = "imagepipe.progress."
	SubjectStalled        = "imagepipe.alerts.stalled"
	SubjectAlerts         = "imagepipe.alerts.>"

	// StatusBucket is the JetStream key-value bucket holding each image's
	// current state, keyed by StatusKey.
	StatusBucket = "imagepipe_status"
)

// Event types (the CloudEvents "type" attribute).
const (
	TypeConvertJob   = "io.imagepipe.job.convert"
	TypeConverted    = "io.imagepipe.image.converted"
	TypeFailed       = "io.imagepipe.image.failed"
	TypeProgress     = "io.imagepipe.image.progress"
	TypeStalled      = "io.imagepipe.queue.stalled"
	TypeQueueRecover = "io.imagepipe.queue.recovered"
)

// ProgressSubject is where live progress of one job is published.
func ProgressSubject(jobID string) string { return SubjectProgressPrefix + jobID }
