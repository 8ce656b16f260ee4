package events

import (
	"strings"
	"time"
)

// State is where one image is in its life.
type State string

const (
	StateUploaded    State = "UPLOADED"
	StateQueued      State = "QUEUED"
	StateDownloading State = "DOWNLOADING"
	StateInspecting  State = "INSPECTING"
	StateConverting  State = "CONVERTING"
	StateUploading   State = "UPLOADING"
	StateReady       State = "READY"
	StateFailed      State = "FAILED"
	StateDuplicate   State = "DUPLICATE"
	StateCancelled   State = "CANCELLED"
)

// Terminal reports whether no further transition is expected.
func (s State) Terminal() bool {
	switch s {
	case StateReady, StateFailed, StateDuplicate, StateCancelled:
		return true
	}
	return false
}

// Status is the record kept for each input object in StatusBucket.
type Status struct {
	Bucket       string    `json:"bucket"`
	Key          string    `json:"key"`
	JobID        string    `json:"job_id"`
	State        State     `json:"state"`
	Percent      float64   `json:"percent,omitempty"`
	Phase        Phase     `json:"phase,omitempty"`
	Message      string    `json:"message,omitempty"`
	Suggestion   string    `json:"suggestion,omitempty"`
	Rule         string    `json:"rule,omitempty"` // the safety or intake rule that refused the input, if any
	InputFormat  string    `json:"input_format,omitempty"`
	OutputBucket string    `json:"output_bucket,omitempty"`
	OutputKey    string    `json:"output_key,omitempty"`
	Attempt      int       `json:"attempt,omitempty"`
	UpdatedAt    time.Time `json:"updated_at"`
}

// Progress is published on ProgressSubject while a job runs.
type Progress struct {
	JobID      string  `json:"job_id"`
	Bucket     string  `json:"bucket"`
	Key        string  `json:"key"`
	Phase      Phase   `json:"phase"`
	Percent    float64 `json:"percent"`
	BytesDone  int64   `json:"bytes_done"`
	BytesTotal int64   `json:"bytes_total"`
	RateBPS    float64 `json:"rate_bps"`
	ETASeconds float64 `json:"eta_seconds"`
}

// StatusKey maps an input object to a key-value key. KV keys allow only
// [-/_=.a-zA-Z0-9], and object keys may hold any byte, so every byte outside
// [-_a-zA-Z0-9] becomes "=XX". The mapping is reversible and never collides.
func StatusKey(bucket, key string) string {
	var b strings.Builder
	escapeKV(&b, bucket)
	b.WriteByte('.')
	escapeKV(&b, key)
	return b.String()
}

func escapeKV(b *strings.Builder, s string) {
	const hexdigits = "0123456789ABCDEF"
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_':
			b.WriteByte(c)
		default:
			// '.' separates tokens in NATS and '/' is allowed but we keep the
			// key a single token, so both are escaped too.
			b.WriteByte('=')
			b.WriteByte(hexdigits[c>>4])
			b.WriteByte(hexdigits[c&15])
		}
	}
}
