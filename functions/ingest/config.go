package ingest

import (
	"errors"
	"net/netip"
	"net/url"
	"strings"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/config"
	"github.com/imagepipe/imagepipe/internal/lease"
	"github.com/imagepipe/imagepipe/internal/natsrt"
)

// Config is the ingest function's settings.
type Config struct {
	InputBucket  string `env:"IMAGEPIPE_INPUT_BUCKET" envDefault:"uploads" doc:"where uploads land" takes:"a bucket name"`
	OutputBucket string `env:"IMAGEPIPE_OUTPUT_BUCKET" envDefault:"images" doc:"where converted images go" takes:"a bucket name"`
	// OutputPrefix is put before every output key. It must be set, and
	// ingest then never reads under it, when the output bucket is the
	// input bucket.
	OutputPrefix string `env:"IMAGEPIPE_OUTPUT_PREFIX" doc:"put before every output key (a / is added if missing); required when the output bucket is the input bucket, and ingest then never takes anything under it in; may not overlap errors/"`
	// Prefixes, when set, admit only keys under one of them.
	Prefixes []string `env:"IMAGEPIPE_INGEST_PREFIXES" envSeparator:"," doc:"key prefixes; when set, only keys under one of them are converted (default: every key)"`
	// ExcludePrefixes refuse keys under any of them; ErrorPrefix always is.
	ExcludePrefixes []string `env:"IMAGEPIPE_INGEST_EXCLUDE_PREFIXES" envSeparator:"," doc:"key prefixes never converted; errors/ never is, whatever this says"`
	// Extensions admits keys ending in one of them, in any case, optionally
	// followed by a compression suffix; "*" admits every key.
	Extensions []string `env:"IMAGEPIPE_INGEST_EXTENSIONS" envSeparator:"," envDefault:"vhdx,avhdx,vhd,vpc,vmdk,qcow2,qcow,vdi,img,raw,ova" doc:"extensions converted, in any case, optionally followed by .gz, .xz or .zst; * converts every key"`
	// MaxInputSize refuses larger objects (bytes).
	MaxInputSize int64 `env:"IMAGEPIPE_MAX_INPUT_SIZE" envDefault:"1099511627776" doc:"refuse larger objects with a failure event; also bounds imports"`
	// ReconcileEvery is how often one replica lists the input bucket for
	// uploads whose notification was lost; 0 turns it off.
	ReconcileEvery time.Duration `env:"IMAGEPIPE_RECONCILE_EVERY" envDefault:"10m" doc:"how often one ingest replica lists the input bucket for uploads whose notification was lost; 0 turns it off"`

	// URL import. The scheme, host and port lists hold every URL and
	// redirect hop; the address rule holds every address dialled, and
	// only a public one passes unless its network is allowed. In code, a
	// zero value means the default, except ImportMaxRedirects (0 follows
	// none).
	ImportAllowedSchemes     []string       `env:"IMAGEPIPE_IMPORT_ALLOWED_SCHEMES" envSeparator:"," envDefault:"http,https" doc:"URL schemes imagepipe import may fetch, checked at the URL and at every redirect (only http and https can ever be fetched)"`
	ImportDisallowedSchemes  []string       `env:"IMAGEPIPE_IMPORT_DISALLOWED_SCHEMES" envSeparator:"," doc:"URL schemes an import may not fetch"`
	ImportAllowedHosts       []string       `env:"IMAGEPIPE_IMPORT_ALLOWED_HOSTS" envSeparator:"," doc:"host names or IP addresses an import may fetch from, at the URL and every redirect (default: any); an entry starting with a dot (.example.com) matches every name under it"`
	ImportDisallowedHosts    []string       `env:"IMAGEPIPE_IMPORT_DISALLOWED_HOSTS" envSeparator:"," doc:"host names or IP addresses an import may not fetch from, as IMAGEPIPE_IMPORT_ALLOWED_HOSTS"`
	ImportAllowedPorts       []PortRange    `env:"IMAGEPIPE_IMPORT_ALLOWED_PORTS" envSeparator:"," envDefault:"80,443" doc:"ports an import may fetch from; a URL without a port is held to its scheme's default"`
	ImportDisallowedPorts    []PortRange    `env:"IMAGEPIPE_IMPORT_DISALLOWED_PORTS" envSeparator:"," doc:"ports an import may not fetch from"`
	ImportAllowedNetworks    []netip.Prefix `env:"IMAGEPIPE_IMPORT_ALLOWED_NETWORKS" envSeparator:"," doc:"networks an import may reach although they are not public; the only way to let imports reach loopback, private, link-local or other non-global addresses"`
	ImportDisallowedNetworks []netip.Prefix `env:"IMAGEPIPE_IMPORT_DISALLOWED_NETWORKS" envSeparator:"," doc:"networks an import never reaches, public or not (for example your own S3 endpoint's public addresses); wins over the allowed networks"`
	ImportProxy              *url.URL       `env:"IMAGEPIPE_IMPORT_PROXY" secret:"url" doc:"an http(s) proxy for imports; HTTP_PROXY, HTTPS_PROXY and NO_PROXY are ignored by imports. The proxy then dials the sources, so it must refuse internal addresses itself" takes:"an http:// or https:// URL"`
	ImportMaxRedirects       int            `env:"IMAGEPIPE_IMPORT_MAX_REDIRECTS" envDefault:"5" doc:"redirects an import follows; 0 follows none"`
	ImportTimeout            time.Duration  `env:"IMAGEPIPE_IMPORT_TIMEOUT" envDefault:"6h" doc:"an import still running after this is aborted (rule import-timeout)"`
	ImportIdleTimeout        time.Duration  `env:"IMAGEPIPE_IMPORT_IDLE_TIMEOUT" envDefault:"2m" doc:"an import whose source sends nothing (no headers, or no body bytes) for this long is aborted (rule import-idle)"`
	ImportMaxConcurrent      int            `env:"IMAGEPIPE_IMPORT_MAX_CONCURRENT" envDefault:"4" doc:"imports one ingest replica runs at once; over it an import is refused at once (rule import-busy), never queued"`

	// ReconcileStaleAfter is how long a non-final status may stand still,
	// its job gone from the queue, before reconcile queues the job again.
	// Zero means StaleBound of convert's AckWait and back-off.
	ReconcileStaleAfter time.Duration `env:"IMAGEPIPE_RECONCILE_STALE_AFTER" doc:"how long a status of QUEUED … UPLOADING may stand still, its job gone from the JOBS stream, before reconcile queues the job again (default: max(2 × IMAGEPIPE_ACK_WAIT, longest back-off step) + 1m, 21m with the defaults)"`
}

// Validate refuses, before anything connects, limits that admit nothing
// and a proxy imports could not use.
func (c Config) Validate() error {
	problems := []error{
		config.Bucket("IMAGEPIPE_INPUT_BUCKET", c.InputBucket),
		config.Bucket("IMAGEPIPE_OUTPUT_BUCKET", c.OutputBucket),
		config.AtLeast("IMAGEPIPE_MAX_INPUT_SIZE", c.MaxInputSize, 1),
		config.AtLeast("IMAGEPIPE_IMPORT_MAX_REDIRECTS", c.ImportMaxRedirects, 0),
		config.Positive("IMAGEPIPE_IMPORT_TIMEOUT", c.ImportTimeout),
		config.Positive("IMAGEPIPE_IMPORT_IDLE_TIMEOUT", c.ImportIdleTimeout),
		config.AtLeast("IMAGEPIPE_IMPORT_MAX_CONCURRENT", c.ImportMaxConcurrent, 1),
	}
	for _, d := range []struct {
		name string
		d    time.Duration
	}{{"IMAGEPIPE_RECONCILE_EVERY", c.ReconcileEvery}, {"IMAGEPIPE_RECONCILE_STALE_AFTER", c.ReconcileStaleAfter}} {
		if d.d < 0 {
			problems = append(problems, config.Invalid(d.name, d.d.String(), "want 0 or more"))
		}
	}
	if p := c.ImportProxy; p != nil && ((p.Scheme != "http" && p.Scheme != "https") || p.Host == "") {
		problems = append(problems, config.Invalid("IMAGEPIPE_IMPORT_PROXY", config.RedactURLs(p.String()), "want an http:// or https:// URL"))
	}
	return errors.Join(problems...)
}

// Binding is how the runtime feeds ingest MinIO's notifications. Checking
// an upload is quick, so a few run at once and a silent replica loses its
// message after half a minute; what fails (S3 or NATS out of reach) is
// tried again soon, five times in all, since an upload whose notification
// is given up on waits for the next reconcile pass.
func (c Config) Binding() natsrt.Binding {
	return natsrt.Binding{
		Stream: events.StreamS3Events, Durable: events.ConsumerIngest, FilterSubject: events.SubjectS3Events,
		Concurrency: 4, AckWait: 30 * time.Second, MaxAttempts: 5,
		Backoff: []time.Duration{time.Second, 5 * time.Second, 30 * time.Second, time.Minute},
	}
}

// ReconcileLeaseKey is the key of the reconcile lease in its bucket.
const ReconcileLeaseKey = "reconcile"

// ReconcileLease is the bucket of the right to run one period's reconcile
// (lease.Lease.Acquire): its TTL removes the lease a little before the
// next period, so whoever takes it first in a period runs, the others
// skip. No renewal is needed: should a pass outlast its period, a second
// pass is harmless, since reconcile is idempotent. replicas is the
// streams' (IMAGEPIPE_STREAM_REPLICAS).
func (c Config) ReconcileLease(replicas int) lease.Bucket {
	return lease.Bucket{
		Name:        events.ReconcileLeaseBucket,
		Description: "which ingest replica runs the current reconcile period",
		TTL:         c.ReconcileEvery * 9 / 10,
		Replicas:    replicas,
	}
}

// Accepts says what one entry of a port list takes.
func (PortRange) Accepts() string {
	return "a port (443), a range of ports (8000-8099), or * for every port"
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
