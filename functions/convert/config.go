package convert

import (
	"errors"
	"os"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/config"
	"github.com/imagepipe/imagepipe/internal/dedup"
	"github.com/imagepipe/imagepipe/internal/inspect"
	"github.com/imagepipe/imagepipe/internal/natsrt"
)

// Config is the convert function's settings.
type Config struct {
	OutputBucket string `env:"IMAGEPIPE_OUTPUT_BUCKET" envDefault:"images" doc:"where converted images go" takes:"a bucket name"`
	// OutputPrefix is put before every output key. It must be set, and
	// ingest then never reads under it, when the output bucket is the
	// input bucket.
	OutputPrefix string `env:"IMAGEPIPE_OUTPUT_PREFIX" doc:"put before every output key (a / is added if missing); required when the output bucket is the input bucket, and ingest then never takes anything under it in; may not overlap errors/"`
	OutputFormat string `env:"IMAGEPIPE_OUTPUT_FORMAT" envDefault:"raw" doc:"raw or qcow2" takes:"raw or qcow2"`
	// ScratchDir is where jobs download and convert; empty means the OS
	// temp dir. Each job gets its own directory, removed when it ends.
	ScratchDir        string `env:"IMAGEPIPE_SCRATCH_DIR" doc:"local scratch space (default: the OS temp dir), an existing directory; one directory per job, removed when it ends; its files bypass the page cache where the file system allows it" takes:"an existing directory"`
	MaxConcurrentJobs int    `env:"IMAGEPIPE_MAX_CONCURRENT_JOBS" envDefault:"2" doc:"jobs one convert replica runs at once (it never fetches more)"`
	// MaxVirtualSize refuses images claiming more than this many bytes.
	MaxVirtualSize int64 `env:"IMAGEPIPE_MAX_VIRTUAL_SIZE" envDefault:"2199023255552" doc:"refuse images claiming a larger virtual size"`
	// ConvertTimeoutPerGiB bounds qemu-img convert's wall clock in
	// proportion to the virtual size, on top of ConvertTimeoutBase.
	ConvertTimeoutBase   time.Duration `env:"IMAGEPIPE_CONVERT_TIMEOUT_BASE" envDefault:"5m" doc:"wall-clock limit of one qemu-img convert, plus IMAGEPIPE_CONVERT_TIMEOUT_PER_GIB per GiB of virtual size"`
	ConvertTimeoutPerGiB time.Duration `env:"IMAGEPIPE_CONVERT_TIMEOUT_PER_GIB" envDefault:"1m" doc:"added to IMAGEPIPE_CONVERT_TIMEOUT_BASE for each GiB of virtual size"`
	// MaxAttempts and RetryBackoff drive redelivery of transient failures:
	// attempt n+1 waits RetryBackoff × 2^(n-1).
	MaxAttempts  int           `env:"IMAGEPIPE_MAX_ATTEMPTS" envDefault:"4" doc:"deliveries of a job before a transient failure becomes final"`
	RetryBackoff time.Duration `env:"IMAGEPIPE_RETRY_BACKOFF" envDefault:"5m" doc:"delay before the 2nd attempt; doubles for each further one"`
	AckWait      time.Duration `env:"IMAGEPIPE_ACK_WAIT" envDefault:"60s" doc:"how soon a job held by a dead convert replica goes to another"`
	// StreamOutput uploads a raw output while qemu-img still writes it,
	// through an NBD export on a socket in the job's scratch dir. Off, the
	// output is uploaded once it is complete.
	StreamOutput bool `env:"IMAGEPIPE_STREAM_OUTPUT" envDefault:"true" doc:"upload a raw output while qemu-img writes it; false uploads it once converted"`
	// Dedup is content de-duplication (IMAGEPIPE_DEDUP, _DEDUP_HASH, ...).
	Dedup dedup.Config
	// OVAMaxMembers and OVAMaxDisks cap the members and the disks of one
	// OVA; an OVA with more is refused whole, before anything is extracted.
	OVAMaxMembers int `env:"IMAGEPIPE_OVA_MAX_MEMBERS" envDefault:"64" doc:"refuse an OVA holding more tar members than this, as a whole"`
	OVAMaxDisks   int `env:"IMAGEPIPE_OVA_MAX_DISKS" envDefault:"16" doc:"refuse an OVA holding more disks than this, as a whole"`
	// ScratchReserve is the space of the scratch file system a download
	// leaves free, however much it is allowed to expand to: what other
	// jobs and the host keep for themselves. Below 0 (the default) it is
	// a twentieth of the file system, at most 1 GiB.
	ScratchReserve int64 `env:"IMAGEPIPE_SCRATCH_RESERVE" envDefault:"-1" doc:"space of the scratch file system a download never fills, however far the upload expands (rule scratch-space); -1 is a twentieth of the file system, at most 1GiB"`
}

// Validate refuses, before anything connects, settings convert could
// only fail on later: an output format it does not write, limits that
// admit nothing, a scratch directory that is not there.
func (c Config) Validate() error {
	problems := []error{
		config.Bucket("IMAGEPIPE_OUTPUT_BUCKET", c.OutputBucket),
		config.OneOf("IMAGEPIPE_OUTPUT_FORMAT", c.OutputFormat, "raw", "qcow2"),
		config.AtLeast("IMAGEPIPE_MAX_CONCURRENT_JOBS", c.MaxConcurrentJobs, 1),
		config.AtLeast("IMAGEPIPE_MAX_VIRTUAL_SIZE", c.MaxVirtualSize, 1),
		config.Positive("IMAGEPIPE_CONVERT_TIMEOUT_BASE", c.ConvertTimeoutBase),
		config.AtLeast("IMAGEPIPE_MAX_ATTEMPTS", c.MaxAttempts, 1),
		config.Positive("IMAGEPIPE_ACK_WAIT", c.AckWait),
		config.AtLeast("IMAGEPIPE_OVA_MAX_MEMBERS", c.OVAMaxMembers, 1),
		config.AtLeast("IMAGEPIPE_OVA_MAX_DISKS", c.OVAMaxDisks, 1),
	}
	if c.ConvertTimeoutPerGiB < 0 {
		problems = append(problems, config.Invalid("IMAGEPIPE_CONVERT_TIMEOUT_PER_GIB", c.ConvertTimeoutPerGiB.String(), "want 0 or more"))
	}
	if c.MaxAttempts > 1 {
		problems = append(problems, config.Positive("IMAGEPIPE_RETRY_BACKOFF", c.RetryBackoff))
	}
	if c.ScratchDir != "" {
		if fi, err := os.Stat(c.ScratchDir); err != nil || !fi.IsDir() {
			problems = append(problems, config.Invalid("IMAGEPIPE_SCRATCH_DIR", c.ScratchDir, "want an existing directory"))
		}
	}
	return errors.Join(problems...)
}

// InspectLimits are the inspector's limits: what convert holds images to,
// and what `imagepipe inspect` judges them by.
func (c Config) InspectLimits() inspect.Limits {
	return inspect.Limits{MaxVirtualSize: c.MaxVirtualSize, MaxOVAMembers: c.OVAMaxMembers, MaxOVADisks: c.OVAMaxDisks}
}

// Scratch is the scratch directory: ScratchDir, or the OS temp dir.
func (c Config) Scratch() string {
	if c.ScratchDir == "" {
		return os.TempDir()
	}
	return c.ScratchDir
}

// Backoff is the redelivery schedule for MaxAttempts.
func (c Config) Backoff() []time.Duration {
	var out []time.Duration
	d := c.RetryBackoff
	for i := 1; i < c.MaxAttempts; i++ {
		out = append(out, d)
		d *= 2
	}
	return out
}

// Binding is how the runtime feeds convert its jobs: the JOBS work queue,
// no more jobs at once than MaxConcurrentJobs, and the attempts and
// back-off of the settings. Each job names its input, so that an operator
// can cancel it by bucket and key.
func (c Config) Binding() natsrt.Binding {
	return natsrt.Binding{
		Stream: events.StreamJobs, Durable: events.ConsumerConvert, FilterSubject: events.SubjectConvertJob,
		Concurrency: c.MaxConcurrentJobs, AckWait: c.AckWait,
		MaxAttempts: c.MaxAttempts, Backoff: c.Backoff(),
		Describe: natsrt.Describe(events.TypeConvertJob, func(job events.ConvertJob) events.JobRef {
			return events.JobRef{ID: job.JobID, Bucket: job.Bucket, Key: job.Key}
		}),
	}
}

func (c Config) convertTimeout(virtualSize int64) time.Duration {
	gib := (virtualSize + 1<<30 - 1) >> 30
	return c.ConvertTimeoutBase + time.Duration(gib)*c.ConvertTimeoutPerGiB
}
