package ingest

import (
	"net/netip"
	"net/url"
	"strings"
	"time"
)

// Config is the ingest function's settings.
type Config struct {
	InputBucket  string `env:"IMAGEPIPE_INPUT_BUCKET" envDefault:"uploads"`
	OutputBucket string `env:"IMAGEPIPE_OUTPUT_BUCKET" envDefault:"images"`
	// OutputPrefix is put before every output key. It must be set, and
	// ingest then never reads under it, when the output bucket is the
	// input bucket.
	OutputPrefix string `env:"IMAGEPIPE_OUTPUT_PREFIX"`
	// Prefixes, when set, admit only keys under one of them.
	Prefixes []string `env:"IMAGEPIPE_INGEST_PREFIXES" envSeparator:","`
	// ExcludePrefixes refuse keys under any of them; ErrorPrefix always is.
	ExcludePrefixes []string `env:"IMAGEPIPE_INGEST_EXCLUDE_PREFIXES" envSeparator:","`
	// Extensions admits keys ending in one of them, in any case, optionally
	// followed by a compression suffix; "*" admits every key.
	Extensions []string `env:"IMAGEPIPE_INGEST_EXTENSIONS" envSeparator:"," envDefault:"vhdx,avhdx,vhd,vpc,vmdk,qcow2,qcow,vdi,img,raw,ova"`
	// MaxInputSize refuses larger objects (bytes).
	MaxInputSize int64 `env:"IMAGEPIPE_MAX_INPUT_SIZE" envDefault:"1099511627776"`
	// ReconcileEvery is how often one replica lists the input bucket for
	// uploads whose notification was lost; 0 turns it off.
	ReconcileEvery time.Duration `env:"IMAGEPIPE_RECONCILE_EVERY" envDefault:"10m"`

	// URL import. The scheme, host and port lists hold every URL and
	// redirect hop; the address rule holds every address dialled, and
	// only a public one passes unless its network is allowed. In code, a
	// zero value means the default, except ImportMaxRedirects (0 follows
	// none).
	ImportAllowedSchemes     []string       `env:"IMAGEPIPE_IMPORT_ALLOWED_SCHEMES" envSeparator:"," envDefault:"http,https"`
	ImportDisallowedSchemes  []string       `env:"IMAGEPIPE_IMPORT_DISALLOWED_SCHEMES" envSeparator:","`
	ImportAllowedHosts       []string       `env:"IMAGEPIPE_IMPORT_ALLOWED_HOSTS" envSeparator:","`
	ImportDisallowedHosts    []string       `env:"IMAGEPIPE_IMPORT_DISALLOWED_HOSTS" envSeparator:","`
	ImportAllowedPorts       []PortRange    `env:"IMAGEPIPE_IMPORT_ALLOWED_PORTS" envSeparator:"," envDefault:"80,443"`
	ImportDisallowedPorts    []PortRange    `env:"IMAGEPIPE_IMPORT_DISALLOWED_PORTS" envSeparator:","`
	ImportAllowedNetworks    []netip.Prefix `env:"IMAGEPIPE_IMPORT_ALLOWED_NETWORKS" envSeparator:","`
	ImportDisallowedNetworks []netip.Prefix `env:"IMAGEPIPE_IMPORT_DISALLOWED_NETWORKS" envSeparator:","`
	ImportProxy              *url.URL       `env:"IMAGEPIPE_IMPORT_PROXY"`
	ImportMaxRedirects       int            `env:"IMAGEPIPE_IMPORT_MAX_REDIRECTS" envDefault:"5"`
	ImportTimeout            time.Duration  `env:"IMAGEPIPE_IMPORT_TIMEOUT" envDefault:"6h"`
	ImportIdleTimeout        time.Duration  `env:"IMAGEPIPE_IMPORT_IDLE_TIMEOUT" envDefault:"2m"`
	ImportMaxConcurrent      int            `env:"IMAGEPIPE_IMPORT_MAX_CONCURRENT" envDefault:"4"`

	// ReconcileStaleAfter is how long a non-final status may stand still,
	// its job gone from the queue, before reconcile queues the job again.
	// Zero means StaleBound of convert's AckWait and back-off.
	ReconcileStaleAfter time.Duration `env:"IMAGEPIPE_RECONCILE_STALE_AFTER"`
}

// Defaults for a Config built in code rather than parsed from the
// environment.
var (
	DefaultExtensions   = []string{"vhdx", "avhdx", "vhd", "vpc", "vmdk", "qcow2", "qcow", "vdi", "img", "raw", "ova"}
	DefaultMaxInputSize = int64(1 << 40)
	// DefaultReconcileStaleAfter is StaleBound of convert's default
	// AckWait (60s) and back-off (5m, 10m, 20m).
	DefaultReconcileStaleAfter = StaleBound(time.Minute, []time.Duration{5 * time.Minute, 10 * time.Minute, 20 * time.Minute})
)

// compressionSuffixes may follow an allowed extension: convert
// decompresses before it inspects.
var compressionSuffixes = []string{".gz", ".xz", ".zst"}

// normalized fills defaults and puts lists in the form the rules compare.
func (c Config) normalized() Config {
	c.Prefixes = cleanList(c.Prefixes, false)
	c.ExcludePrefixes = cleanList(c.ExcludePrefixes, false)
	c.Extensions = cleanList(c.Extensions, true)
	if len(c.Extensions) == 0 {
		c.Extensions = DefaultExtensions
	}
	if c.MaxInputSize <= 0 {
		c.MaxInputSize = DefaultMaxInputSize
	}
	if c.ReconcileStaleAfter <= 0 {
		c.ReconcileStaleAfter = DefaultReconcileStaleAfter
	}
	return c
}

func cleanList(in []string, extensions bool) []string {
	var out []string
	for _, s := range in {
		s = strings.TrimSpace(s)
		if extensions {
			s = strings.ToLower(strings.TrimPrefix(s, "."))
		}
		if s != "" {
			out = append(out, s)
		}
	}
	return out
}
