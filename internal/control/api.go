package control

import (
	"time"

	"github.com/imagepipe/imagepipe/internal/natsrt"
)

// Functions are the functions that run as replicas, in the order tables
// list them.
var Functions = []string{"ingest", "convert", "notify"}

// Verbs of the control API. Each is an endpoint of every replica's service
// on Subject(function, verb).
const (
	VerbStatus = "status"
	VerbStats  = "stats"
	VerbPause  = "pause"
	VerbResume = "resume"
	VerbDrain  = "drain"
	VerbStop   = "stop"
	VerbCancel = "cancel"
)

// Verbs lists every verb.
var Verbs = []string{VerbStatus, VerbStats, VerbPause, VerbResume, VerbDrain, VerbStop, VerbCancel}

// SubjectPrefix starts every control subject.
const SubjectPrefix = "imagepipe.ctl"

// Subject is where every replica of function listens for verb. There is no
// queue group: each replica answers for itself, and a client gathers the
// answers.
func Subject(function, verb string) string { return SubjectPrefix + "." + function + "." + verb }

// ServiceName is the micro service name of function's replicas, as
// `nats micro ls` shows it.
func ServiceName(function string) string { return "imagepipe-" + function }

// Request is the body of every control request; all of it is optional.
type Request struct {
	// Instance limits the request to the replica with that id; others
	// stay silent.
	Instance string `json:"instance,omitempty"`
	// Bucket and Key name the input whose job cancel stops.
	Bucket string `json:"bucket,omitempty"`
	Key    string `json:"key,omitempty"`
}

// Replica identifies the replica that answered.
type Replica struct {
	Function string `json:"function"`
	Instance string `json:"instance"`
	Host     string `json:"host"`
	PID      int    `json:"pid"`
	Version  string `json:"version"`
}

// Status is the answer to status, and to pause, resume, drain and stop,
// which answer with the state they leave the replica in.
type Status struct {
	Replica
	State         natsrt.State      `json:"state"`
	InFlight      int64             `json:"in_flight"`
	Jobs          []natsrt.JobInfo  `json:"jobs"`
	Started       time.Time         `json:"started"`
	UptimeSeconds float64           `json:"uptime_seconds"`
	Config        map[string]string `json:"config,omitempty"`
}

// ReplicaStats is the answer to stats: what this replica has done since it
// started, and the queue in front of its consumer.
type ReplicaStats struct {
	Replica
	State           natsrt.State  `json:"state"`
	InFlight        int64         `json:"in_flight"`
	UptimeSeconds   float64       `json:"uptime_seconds"`
	Counts          natsrt.Counts `json:"counts"`
	QueuePending    uint64        `json:"queue_pending"`
	QueueAckPending uint64        `json:"queue_ack_pending"`
	QueueError      string        `json:"queue_error,omitempty"`
}

// CancelReply is the answer to cancel: the jobs of the input this replica
// was running and has cancelled, none when it was not running any.
type CancelReply struct {
	Replica
	Cancelled []natsrt.JobInfo `json:"cancelled"`
}
