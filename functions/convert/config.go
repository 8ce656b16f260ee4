package convert

import (
	"os"
	"time"

	"github.com/imagepipe/imagepipe/internal/dedup"
	"github.com/imagepipe/imagepipe/internal/inspect"
)

// Config is the convert function's settings.
type Config struct {
	OutputBucket string `env:"IMAGEPIPE_OUTPUT_BUCKET" envDefault:"images"`
	// OutputPrefix is put before every output key. It must be set, and
	// ingest then never reads under it, when the output bucket is the
	// input bucket.
	OutputPrefix string `env:"IMAGEPIPE_OUTPUT_PREFIX"`
	OutputFormat string `env:"IMAGEPIPE_OUTPUT_FORMAT" envDefault:"raw"`
	// ScratchDir is where jobs download and convert; empty means the OS
	// temp dir. Each job gets its own directory, removed when it ends.
	ScratchDir        string `env:"IMAGEPIPE_SCRATCH_DIR"`
	MaxConcurrentJobs int    `env:"IMAGEPIPE_MAX_CONCURRENT_JOBS" envDefault:"2"`
	// MaxVirtualSize refuses images claiming more than this many bytes.
	MaxVirtualSize int64 `env:"IMAGEPIPE_MAX_VIRTUAL_SIZE" envDefault:"2199023255552"`
	// ConvertTimeoutPerGiB bounds qemu-img convert's wall clock in
	// proportion to the virtual size, on top of ConvertTimeoutBase.
	ConvertTimeoutBase   time.Duration `env:"IMAGEPIPE_CONVERT_TIMEOUT_BASE" envDefault:"5m"`
	ConvertTimeoutPerGiB time.Duration `env:"IMAGEPIPE_CONVERT_TIMEOUT_PER_GIB" envDefault:"1m"`
	// MaxAttempts and RetryBackoff drive redelivery of transient failures:
	// attempt n+1 waits RetryBackoff × 2^(n-1).
	MaxAttempts  int           `env:"IMAGEPIPE_MAX_ATTEMPTS" envDefault:"4"`
	RetryBackoff time.Duration `env:"IMAGEPIPE_RETRY_BACKOFF" envDefault:"5m"`
	AckWait      time.Duration `env:"IMAGEPIPE_ACK_WAIT" envDefault:"60s"`
	// StreamOutput uploads a raw output while qemu-img still writes it,
	// through an NBD export on a socket in the job's scratch dir. Off, the
	// output is uploaded once it is complete.
	StreamOutput bool `env:"IMAGEPIPE_STREAM_OUTPUT" envDefault:"true"`
	// Dedup is content de-duplication (IMAGEPIPE_DEDUP, _DEDUP_HASH, ...).
	Dedup dedup.Config
	// OVAMaxMembers and OVAMaxDisks cap the members and the disks of one
	// OVA; an OVA with more is refused whole, before anything is extracted.
	OVAMaxMembers int `env:"IMAGEPIPE_OVA_MAX_MEMBERS" envDefault:"64"`
	OVAMaxDisks   int `env:"IMAGEPIPE_OVA_MAX_DISKS" envDefault:"16"`
	// ScratchReserve is the space of the scratch file system a download
	// leaves free, however much it is allowed to expand to: what other
	// jobs and the host keep for themselves. Below 0 (the default) it is
	// a twentieth of the file system, at most 1 GiB.
	ScratchReserve int64 `env:"IMAGEPIPE_SCRATCH_RESERVE" envDefault:"-1"`
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

func (c Config) convertTimeout(virtualSize int64) time.Duration {
	gib := (virtualSize + 1<<30 - 1) >> 30
	return c.ConvertTimeoutBase + time.Duration(gib)*c.ConvertTimeoutPerGiB
}
