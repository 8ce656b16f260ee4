package events

// Requests ingest answers on, one replica per request (NATS request/reply,
// JSON bodies). A failed request is answered {"error": "..."} with the
// micro error headers.
const (
	SubjectReconvert = "imagepipe.ctl.reconvert"
	SubjectImport    = "imagepipe.ctl.import"
	SubjectReconcile = "imagepipe.ctl.reconcile"
)

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
