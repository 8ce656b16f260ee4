package events

import "math"

// Phase is the stage of a job, named in every failure.
type Phase string

const (
	PhaseIntake   Phase = "intake"
	PhaseDownload Phase = "download"
	PhaseInspect  Phase = "inspect"
	PhaseConvert  Phase = "convert"
	PhaseVerify   Phase = "verify"
	PhaseUpload   Phase = "upload"
	PhasePublish  Phase = "publish"
)

// Converted is the data of TypeConverted: where the image is and what it is.
// Users rely on these fields, not on naming rules.
type Converted struct {
	JobID        string `json:"job_id"`
	InputBucket  string `json:"input_bucket"`
	InputKey     string `json:"input_key"`
	InputFormat  string `json:"input_format"`
	InputSize    int64  `json:"input_size"`
	VirtualSize  int64  `json:"virtual_size"`
	OutputBucket string `json:"output_bucket"`
	OutputKey    string `json:"output_key"`
	OutputFormat string `json:"output_format"`
	OutputSize   int64  `json:"output_size"`
	SHA256       string `json:"sha256"`
	// CRC64NVME is the output's full-object CRC64NVME, base64 as S3
	// writes it: what `aws s3api head-object --checksum-mode ENABLED`
	// returns where the server keeps it, and the object's tag
	// imagepipe-crc64nvme where it does not (an output with parts copied
	// from the zero object). Empty on outputs made before it was kept.
	CRC64NVME string `json:"crc64nvme,omitempty"`
	// ZeroFraction is the fraction of the output's bytes that were runs
	// of zeros copied server-side instead of sent, 0 to 1.
	ZeroFraction float64 `json:"zero_fraction,omitempty"`
	DurationMS   int64   `json:"duration_ms"`
	Attempt      int     `json:"attempt"`
	// DuplicateOf names the earlier output this one was copied from when
	// the same content had already been converted ("bucket/key").
	DuplicateOf string `json:"duplicate_of,omitempty"`
}

// Failed is the data of TypeFailed: which phase failed, in plain words, and
// what the user can do about it.
type Failed struct {
	JobID       string `json:"job_id"`
	InputBucket string `json:"input_bucket"`
	InputKey    string `json:"input_key"`
	InputFormat string `json:"input_format,omitempty"`
	Phase       Phase  `json:"phase"`
	Message     string `json:"message"`
	Suggestion  string `json:"suggestion,omitempty"`
	// Rule names the safety or intake rule that refused the input, if any.
	Rule       string      `json:"rule,omitempty"`
	Attempt    int         `json:"attempt"`
	WillRetry  bool        `json:"will_retry"`
	DurationMS int64       `json:"duration_ms"`
	System     *SystemInfo `json:"system,omitempty"`
}

// SystemInfo is the context an operator needs to judge a failure.
type SystemInfo struct {
	Host             string `json:"host,omitempty"`
	ScratchFreeBytes int64  `json:"scratch_free_bytes,omitempty"`
	QemuImgVersion   string `json:"qemu_img_version,omitempty"`
}

// ZeroBytes is how many of the output's bytes were copied from the zero
// object: the fraction the event carries, held to 0…1, as a byte count,
// which is what sums across outputs of different sizes.
func (c Converted) ZeroBytes() int64 {
	return int64(math.Round(min(max(c.ZeroFraction, 0), 1) * float64(c.OutputSize)))
}
