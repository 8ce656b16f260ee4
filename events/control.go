package events

import "time"

// Requests ingest answers on, one replica per request (NATS request/reply,
// JSON bodies). A failed request is answered {"error": "..."} with the
// micro error headers.
const (
	SubjectReconvert = SubjectControlPrefix + ".reconvert"
	SubjectImport    = SubjectControlPrefix + ".import"
	SubjectReconcile = SubjectControlPrefix + ".reconcile"
)

// SubjectControlPrefix starts every control subject: the requests above and
// each replica's verbs on SubjectControlPrefix.<function>.<verb>.
const SubjectControlPrefix = "imagepipe.ctl"

// ServiceName is the NATS micro service name of function's replicas, as
// `nats micro ls` shows it.
func ServiceName(function string) string { return "imagepipe-" + function }

// ServiceIntake is the micro service of ingest's requests above, answered
// by one ingest replica per request (its queue group is
// ServiceName(FunctionIngest)).
const ServiceIntake = "imagepipe-intake"

// ReconvertRequest asks for a new conversion of an existing object.
type ReconvertRequest struct {
	Bucket string `json:"bucket"`
	Key    string `json:"key"`
	// Format is "raw" or "qcow2"; empty means the converter's default.
	Format string `json:"format,omitempty"`
}

// ReconvertReply answers a ReconvertRequest: the job id, or why not.
type ReconvertReply struct {
	JobID string `json:"job_id,omitempty"`
	Error string `json:"error,omitempty"`
}

// ImportRequest asks ingest to fetch a URL into the input bucket.
type ImportRequest struct {
	URL string `json:"url"`
	// Bucket and Key name the object to create; Bucket defaults to the
	// input bucket and Key to imports/ plus the URL's file name.
	Bucket string `json:"bucket,omitempty"`
	Key    string `json:"key,omitempty"`
	// SHA256 is the expected hex digest of the body; on a mismatch no
	// object is created.
	SHA256 string `json:"sha256,omitempty"`
	// Replace allows the import to overwrite an existing object at
	// Bucket/Key; without it such an import is refused.
	Replace bool `json:"replace,omitempty"`
}

// ImportReply answers an ImportRequest once the source has answered and
// the transfer has started; the transfer itself goes on without the asker.
type ImportReply struct {
	ImportID string `json:"import_id,omitempty"`
	Bucket   string `json:"bucket,omitempty"`
	Key      string `json:"key,omitempty"`
	// Size is the body's length, -1 when the source did not say.
	Size  int64  `json:"size,omitempty"`
	Error string `json:"error,omitempty"`
}

// ReconcileRequest asks for one reconcile pass now, under Prefix if set.
type ReconcileRequest struct {
	Prefix string `json:"prefix,omitempty"`
	// StaleAfter, a Go duration, overrides for this pass how long a
	// non-final status may stand still before its job counts as lost.
	StaleAfter string `json:"stale_after,omitempty"`
}

// ReconcileResult says what one reconcile pass did.
type ReconcileResult struct {
	Listed  int `json:"listed"`
	Queued  int `json:"queued"`
	Refused int `json:"refused"`
	// Requeued counts uploads whose status stood still in a non-final
	// state with no job in the queue: their job was published again.
	Requeued int `json:"requeued"`
	// Restored counts uploads whose status record was lost but whose
	// output is complete: READY was written back, nothing converted.
	Restored int `json:"restored"`
	// Keys are the keys queued, refused, requeued or restored, at most
	// 100 of them.
	Keys []string `json:"keys,omitempty"`
}

// Verbs every replica answers on ReplicaSubject(function, verb), whatever
// its function.
const (
	VerbStatus = "status"
	VerbStats  = "stats"
	VerbPause  = "pause"
	VerbResume = "resume"
	VerbDrain  = "drain"
	VerbStop   = "stop"
	VerbCancel = "cancel"
)

// Verbs lists every replica verb.
func Verbs() []string {
	return []string{VerbStatus, VerbStats, VerbPause, VerbResume, VerbDrain, VerbStop, VerbCancel}
}

// ReplicaSubject is where every replica of function listens for verb.
// There is no queue group: each replica answers for itself, and the asker
// gathers the answers.
func ReplicaSubject(function, verb string) string {
	return SubjectControlPrefix + "." + function + "." + verb
}

// ControlRequest is the body of every replica verb; all of it is optional.
type ControlRequest struct {
	// Instance limits the request to the replica with that id; others
	// stay silent.
	Instance string `json:"instance,omitempty"`
	// Bucket and Key name the input whose job cancel stops.
	Bucket string `json:"bucket,omitempty"`
	Key    string `json:"key,omitempty"`
}

// Replica identifies the replica that answered. A replica that refuses a
// request answers with micro's error headers and this as the body.
type Replica struct {
	Function string `json:"function"`
	Instance string `json:"instance"`
	Host     string `json:"host"`
	PID      int    `json:"pid"`
	Version  string `json:"version"`
}

// WorkerState is where a replica's worker is in its life.
type WorkerState string

const (
	WorkerStarting WorkerState = "starting" // not bound to its consumer yet
	WorkerRunning  WorkerState = "running"
	WorkerPaused   WorkerState = "paused"   // fetching nothing new; jobs in flight go on
	WorkerDraining WorkerState = "draining" // finishing jobs in flight, then exiting
	WorkerStopping WorkerState = "stopping" // jobs in flight aborted and handed back
	WorkerStopped  WorkerState = "stopped"
)

// JobRef names the input a message works on.
type JobRef struct {
	ID     string `json:"job_id,omitempty"`
	Bucket string `json:"bucket,omitempty"`
	Key    string `json:"key,omitempty"`
}

// JobInfo is one message a replica is handling now.
type JobInfo struct {
	JobRef
	Attempt int       `json:"attempt"`
	Started time.Time `json:"started"`
}

// WorkerCounts are what one replica's worker has done since it started.
// They die with the process; durable statistics come from RESULTS.
type WorkerCounts struct {
	Handled    int64 `json:"handled"`
	Acked      int64 `json:"acked"`
	Retried    int64 `json:"retried"`
	Terminated int64 `json:"terminated"`
	Cancelled  int64 `json:"cancelled"`
	Aborted    int64 `json:"aborted"`
}

// ReplicaStatus answers status, and pause, resume, drain and stop, which
// answer with the state they leave the replica in.
type ReplicaStatus struct {
	Replica
	State         WorkerState       `json:"state"`
	InFlight      int64             `json:"in_flight"`
	Jobs          []JobInfo         `json:"jobs"`
	Started       time.Time         `json:"started"`
	UptimeSeconds float64           `json:"uptime_seconds"`
	Config        map[string]string `json:"config,omitempty"`
}

// ReplicaStats answers stats: what this replica has done since it started,
// and the queue in front of its consumer.
type ReplicaStats struct {
	Replica
	State           WorkerState  `json:"state"`
	InFlight        int64        `json:"in_flight"`
	UptimeSeconds   float64      `json:"uptime_seconds"`
	Counts          WorkerCounts `json:"counts"`
	QueuePending    uint64       `json:"queue_pending"`
	QueueAckPending uint64       `json:"queue_ack_pending"`
	QueueError      string       `json:"queue_error,omitempty"`
}

// CancelReply answers cancel: the jobs of the input this replica was
// running and has cancelled, none when it was running none.
type CancelReply struct {
	Replica
	Cancelled []JobInfo `json:"cancelled"`
}

// CancelResult says how a cancel went, over every replica and the status
// record.
type CancelResult struct {
	Bucket string `json:"bucket"`
	Key    string `json:"key"`
	// Running lists the replicas that were converting the input and have
	// cancelled it; each reports the result itself.
	Running []CancelReply `json:"running,omitempty"`
	// Queued is set when no replica was running the job and its status
	// record now says CANCELLED, so that convert skips it when it comes.
	Queued bool   `json:"queued"`
	JobID  string `json:"job_id,omitempty"`
}

// Codes of a failed control request, in micro's error code header: the
// asker's mistake, to be fixed before asking again, or a failure on the
// answering side.
const (
	CodeBadRequest = "400"
	CodeFailed     = "500"
)

// ErrorReply is the body of a refused request to ingest, beside micro's
// error headers, so that a plain `nats req` shows why.
type ErrorReply struct {
	Error string `json:"error"`
}
