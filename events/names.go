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

// The functions, each a process an operator runs as replicas. Each name is
// also its durable consumer's, its NATS user's in infra/nats, and the
// function part of its control subjects.
const (
	FunctionIngest  = "ingest"
	FunctionConvert = "convert"
	FunctionNotify  = "notify"
)

// Functions lists the functions in the order tables show them.
func Functions() []string { return []string{FunctionIngest, FunctionConvert, FunctionNotify} }

// Durable consumers, one per function, named after it: ingest reads
// S3_EVENTS, convert JOBS, notify RESULTS. Monitoring (the stall watchdog,
// `imagepipe ctl stats`, KEDA's lag trigger) looks them up by these names.
const (
	ConsumerIngest  = FunctionIngest
	ConsumerConvert = FunctionConvert
	ConsumerNotify  = FunctionNotify
)

// Key-value buckets besides StatusBucket. Their names are in the NATS
// permissions an operator deploys (infra/nats/accounts.conf).
const (
	// DedupBucket maps content hashes to the output already made from them.
	DedupBucket = "imagepipe_dedup"
	// NotifyLedgerBucket records which result events notify has delivered.
	NotifyLedgerBucket = "imagepipe_notify_ledger"
	// WatchdogBucket holds the lease of notify's stall watchdog.
	WatchdogBucket = "imagepipe_notify_watchdog"
	// ReconcileLeaseBucket holds the lease of ingest's periodic reconcile.
	ReconcileLeaseBucket = "imagepipe_reconcile_lease"
)

// CloudEvents sources of the events each function publishes.
const (
	SourceIngest  = "/imagepipe/ingest"
	SourceConvert = "/imagepipe/convert"
	// SourceWatchdog is notify's stall watchdog, the source of
	// TypeStalled and TypeQueueRecover events.
	SourceWatchdog = "imagepipe/notify/watchdog"
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
