package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/convert"
	"github.com/imagepipe/imagepipe/functions/ingest"
	"github.com/imagepipe/imagepipe/functions/notify"
	"github.com/imagepipe/imagepipe/internal/config"
	"github.com/imagepipe/imagepipe/internal/control"
	"github.com/imagepipe/imagepipe/internal/fleet"
	"github.com/imagepipe/imagepipe/internal/metrics"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/setup"
	"github.com/imagepipe/imagepipe/internal/status"
)

// settings is what the functions read from the environment. A function's
// process fills only the parts it uses (loadFunctionSettings), and so does
// a command (loadCommandSettings); dev, which runs every function, fills
// all of them (loadSettings).
type settings struct {
	Log     logSettings
	NATS    natsrt.Config
	S3      objstore.Config
	Streams setup.StreamConfig
	Buckets setup.BucketConfig
	Ingest  ingest.Config
	Convert convert.Config
	Notify  notify.Config
	Metrics metrics.Config
}

// loadSettings reads and validates every part of the settings, for dev,
// which runs every function. It contacts nothing.
func loadSettings() (settings, error) {
	var s settings
	err := config.Load(config.Environ(), s.allParts()...)
	return s, err
}

// loadCommandSettings reads and validates into parts, each a pointer to a
// part of the settings (&s.NATS, &s.S3, ...), what a command uses and
// nothing else, so that a setting only a function reads (a scratch
// directory, a webhook) can never stop a command. How every process logs
// is always checked. It contacts nothing.
func loadCommandSettings(parts ...any) error {
	var log logSettings
	return config.Load(config.Environ(), append([]any{&log}, parts...)...)
}

// uploadBucket is the input bucket for a command that writes into it,
// checked as ingest checks it.
type uploadBucket inputBucket

func (b uploadBucket) Validate() error { return config.Bucket("IMAGEPIPE_INPUT_BUCKET", b.Name) }

// allParts are the settings of every function.
func (s *settings) allParts() []any {
	return []any{&s.Log, &s.NATS, &s.S3, &s.Streams, &s.Buckets, &s.Ingest, &s.Convert, &s.Notify, &s.Metrics}
}

// functionNames are the functions, in the order of the flow.
var functionNames = events.Functions()

// retrySchedule is the part of convert's settings ingest reads: how long
// a job may stand still before reconcile deems it lost follows from it.
// Its tags are convert.Config's (a test holds them equal).
type retrySchedule struct {
	MaxAttempts  int           `env:"IMAGEPIPE_MAX_ATTEMPTS" envDefault:"4" doc:"deliveries of a job before a transient failure becomes final"`
	RetryBackoff time.Duration `env:"IMAGEPIPE_RETRY_BACKOFF" envDefault:"5m" doc:"delay before the 2nd attempt; doubles for each further one"`
	AckWait      time.Duration `env:"IMAGEPIPE_ACK_WAIT" envDefault:"60s" doc:"how soon a job held by a dead convert replica goes to another"`
}

// inputBucket is the one ingest setting convert reads: it never writes
// into the input bucket's namespace of uploads.
type inputBucket struct {
	Name string `env:"IMAGEPIPE_INPUT_BUCKET" envDefault:"uploads" doc:"where uploads land" takes:"a bucket name"`
}

// functionParts are the parts of the settings one function reads, and
// what fills in the rest from them once they are loaded.
func (s *settings) functionParts(name string) (parts []any, finish func(), err error) {
	shared := []any{&s.Log, &s.NATS, &s.Streams, &s.Metrics}
	switch name {
	case events.FunctionIngest:
		var sched retrySchedule
		return append(shared, &s.S3, &s.Buckets, &s.Ingest, &sched), func() {
			s.Convert.OutputBucket, s.Convert.OutputPrefix = s.Ingest.OutputBucket, s.Ingest.OutputPrefix
			s.Convert.MaxAttempts, s.Convert.RetryBackoff, s.Convert.AckWait = sched.MaxAttempts, sched.RetryBackoff, sched.AckWait
		}, nil
	case events.FunctionConvert:
		var in inputBucket
		return append(shared, &s.S3, &s.Convert, &in), func() { s.Ingest.InputBucket = in.Name }, nil
	case events.FunctionNotify:
		// The watchdog counts lost jobs by reconcile's bound (orphanBound).
		bound, finish := s.staleBoundParts()
		return append(append(shared, &s.Notify), bound...), finish, nil
	case "all":
		return s.allParts(), func() {}, nil
	}
	return nil, nil, fmt.Errorf("unknown function %q: want %s or all", name, strings.Join(functionNames, ", "))
}

// staleBoundParts are the settings reconcile's staleness bound follows
// from (reconcileStaleAfter), for those who count lost jobs by it without
// being ingest, and what fills them in once they are loaded.
func (s *settings) staleBoundParts() (parts []any, finish func()) {
	var sched retrySchedule
	var bound orphanBound
	return []any{&sched, &bound}, func() {
		s.Convert.MaxAttempts, s.Convert.RetryBackoff, s.Convert.AckWait = sched.MaxAttempts, sched.RetryBackoff, sched.AckWait
		s.Ingest.ReconcileStaleAfter = bound.StaleAfter
	}
}

// loadFunctionSettings reads and validates what the named function uses,
// and nothing else, so that a setting of another function can never stop
// it. Every problem is reported at once, each naming its variable, and
// nothing is contacted.
func loadFunctionSettings(name string) (settings, error) {
	var s settings
	parts, finish, err := s.functionParts(name)
	if err != nil {
		return s, err
	}
	err = config.Load(config.Environ(), parts...)
	finish()
	if extra := s.crossChecks(name); len(extra) > 0 {
		var p *config.Problems
		if !errors.As(err, &p) {
			p = &config.Problems{}
		}
		p.List = append(p.List, extra...)
		err = p
	}
	return s, err
}

// crossChecks are the checks that span parts: the output layout, and the
// S3 settings a client is built from.
func (s *settings) crossChecks(name string) []error {
	var problems []error
	if name == events.FunctionIngest || name == events.FunctionConvert || name == "all" {
		if err := s.checkOutputLayout(); err != nil {
			problems = append(problems, err)
		}
		if err := checkS3Endpoint(s.S3.Endpoint); err != nil {
			problems = append(problems, err)
		} else if _, err := objstore.New(s.S3); err != nil {
			problems = append(problems, err)
		}
	}
	return problems
}

// checkS3Endpoint refuses what minio-go would: a URL where a host:port
// belongs, the mistake everyone makes once.
func checkS3Endpoint(endpoint string) error {
	host := endpoint
	if h, _, err := net.SplitHostPort(endpoint); err == nil {
		host = h
	}
	if host == "" || strings.ContainsAny(endpoint, "/@ ") {
		return config.Invalid("IMAGEPIPE_S3_ENDPOINT", endpoint, "want HOST or HOST:PORT without a scheme or path, such as minio:9000 (IMAGEPIPE_S3_SECURE=true turns TLS on)")
	}
	return nil
}

// checkOutputLayout refuses, before anything starts, a layout in which a
// conversion could overwrite an upload, and gives ingest and convert the
// output prefix in one form.
func (s *settings) checkOutputLayout() error {
	prefix, err := ingest.OutputLayout(s.Ingest.InputBucket, s.Convert.OutputBucket, s.Convert.OutputPrefix)
	if err != nil {
		return err
	}
	s.Ingest.OutputPrefix, s.Convert.OutputPrefix = prefix, prefix
	return nil
}

// runFunction runs one function as a long-lived service. It validates its
// whole configuration before it connects to anything, then waits for NATS
// as long as it takes, saying where it tries.
func runFunction(ctx, jobCtx context.Context, name string, log *slog.Logger) error {
	s, err := loadFunctionSettings(name)
	if err != nil {
		return err
	}
	log = log.With("function", name)
	nc, err := natsrt.ConnectRetrying(ctx, s.NATS, name, log)
	if err != nil {
		return err
	}
	defer natsrt.Close(nc, 5*time.Second)
	// Metrics exist whether or not they are served, so that any part of
	// the function can record into them.
	m := metrics.New(version, nc)
	w, err := startFunction(ctx, nc, name, s, m, log)
	if err != nil {
		return err
	}
	svc, err := startControl(nc, name, s, w, log)
	if err != nil {
		return err
	}
	defer func() { _ = svc.Stop() }()
	if s.Metrics.Addr != "" {
		stopMetrics, err := startMetrics(s, m, nc, map[string]*natsrt.Worker{name: w}, log)
		if err != nil {
			return err
		}
		defer stopMetrics()
	}
	defer logStatsOnSignal(nc, []*control.Service{svc}, log)()
	log.Info("started", "version", version, "instance", svc.ID())
	// A drain or stop from the control API ends Run like a signal does,
	// and the process exits 0: the operator asked for it.
	err = w.Run(ctx, jobCtx)
	log.Info("stopped", "state", w.State())
	return err
}

// startFunction provisions the streams and binds the named function's
// handler to its consumer.
func startFunction(ctx context.Context, nc *nats.Conn, name string, s settings, m *metrics.Metrics, log *slog.Logger) (*natsrt.Worker, error) {
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jetstream: %w", err)
	}
	// A function started beside a slow or still-forming cluster waits for
	// its JetStream, saying so, rather than exiting.
	ready := func(what string, step func(context.Context) error) error {
		return natsrt.WaitJetStream(ctx, nc, log, what, step)
	}
	if err := ready("JetStream", func(ctx context.Context) error {
		_, err := js.AccountInfo(ctx)
		return err
	}); err != nil {
		return nil, err
	}
	if err := ready("provision streams", func(ctx context.Context) error { return setup.Streams(ctx, js, s.Streams) }); err != nil {
		return nil, err
	}
	var kv jetstream.KeyValue
	if err := ready("open status bucket", func(ctx context.Context) error {
		kv, err = setup.StatusKV(ctx, js, s.Streams.Replicas)
		return err
	}); err != nil {
		return nil, err
	}
	st := status.New(kv, nc)

	switch name {
	case events.FunctionIngest:
		return startIngest(ctx, js, st, s, log)
	case events.FunctionConvert:
		return startConvert(ctx, js, st, s, log)
	case events.FunctionNotify:
		return startNotify(ctx, js, s, m, log)
	}
	return nil, fmt.Errorf("unknown function %q", name)
}

func provisionBuckets(ctx context.Context, s settings) error {
	store, err := objstore.New(s.S3)
	if err != nil {
		return err
	}
	// Say where: an unreachable S3 otherwise shows as a bare dial error.
	where := func(err error) error { return fmt.Errorf("S3 at %s (IMAGEPIPE_S3_ENDPOINT): %w", s.S3.Endpoint, err) }
	if err := setup.Buckets(ctx, store.Client(), s.Ingest.InputBucket, s.Convert.OutputBucket); err != nil {
		return where(err)
	}
	if s.Buckets.NotifyTarget == "" {
		return nil
	}
	if err := setup.Notification(ctx, store.Client(), s.Ingest.InputBucket, s.Buckets.NotifyTarget); err != nil {
		return where(err)
	}
	return nil
}

// startControl registers the replica's control service.
func startControl(nc *nats.Conn, name string, s settings, w *natsrt.Worker, log *slog.Logger) (*control.Service, error) {
	return control.Start(nc, control.Options{
		Function: name,
		Version:  version,
		Config:   configSummary(name, s),
		Worker:   w,
		Log:      log,
	})
}

// startMetrics serves /metrics, /healthz and /readyz for the workers of
// this process until the returned func is called.
func startMetrics(s settings, m *metrics.Metrics, nc *nats.Conn, workers map[string]*natsrt.Worker, log *slog.Logger) (stop func(), err error) {
	checks := []metrics.Check{metrics.NATSCheck(nc)}
	var unfollow []func()
	for name, w := range workers {
		unfollow = append(unfollow, m.Follow(name, w))
		checks = append(checks, metrics.ConsumerCheck(name, w, func() bool {
			switch w.State() {
			case events.WorkerRunning, events.WorkerPaused, events.WorkerDraining:
				return true
			}
			return false
		}))
	}
	if c, ok := storageCheck(s, workers); ok {
		checks = append(checks, c)
	}
	srv, err := metrics.Serve(s.Metrics.Addr, m.Handler(checks...), log)
	if err != nil {
		return nil, err
	}
	log.Info("metrics listening", "addr", srv.Addr())
	return func() {
		srv.Close()
		for _, f := range unfollow {
			f()
		}
	}, nil
}

// storageCheck probes the buckets the functions among workers use: ingest
// reads the input bucket's notifications, convert reads inputs and writes
// outputs. notify uses no storage.
func storageCheck(s settings, workers map[string]*natsrt.Worker) (metrics.Check, bool) {
	var buckets []string
	if _, ok := workers[events.FunctionIngest]; ok {
		buckets = append(buckets, s.Ingest.InputBucket)
	}
	if _, ok := workers[events.FunctionConvert]; ok {
		buckets = append(buckets, s.Ingest.InputBucket, s.Convert.OutputBucket)
	}
	if len(buckets) == 0 {
		return metrics.Check{}, false
	}
	return metrics.Check{Name: "s3", Probe: func(ctx context.Context) error {
		store, err := objstore.New(s.S3)
		if err != nil {
			return err
		}
		for _, b := range slices.Compact(buckets) {
			ok, err := store.Client().BucketExists(ctx, b)
			if err != nil {
				return fmt.Errorf("%s: %w", s.S3.Endpoint, err)
			}
			if !ok {
				return fmt.Errorf("bucket %s does not exist", b)
			}
		}
		return nil
	}}, true
}

// configSummary is what `imagepipe ctl status` shows of a replica's
// settings. It lists settings one by one rather than dumping the struct,
// so that a secret added to the configuration later is never shown by
// accident.
func configSummary(name string, s settings) map[string]string {
	c := map[string]string{
		"nats_url":        config.RedactURLs(s.NATS.Servers()),
		"nats_creds":      setOrNone(s.NATS.Creds),
		"stream_replicas": strconv.Itoa(s.Streams.Replicas),
		"metrics_addr":    s.Metrics.Addr,
	}
	switch name {
	case events.FunctionIngest:
		c["s3_endpoint"] = s.S3.Endpoint
		c["input_bucket"] = s.Ingest.InputBucket
		c["output_prefix"] = s.Ingest.OutputPrefix
	case events.FunctionConvert:
		c["s3_endpoint"] = s.S3.Endpoint
		c["output_bucket"] = s.Convert.OutputBucket
		c["output_prefix"] = s.Convert.OutputPrefix
		c["output_format"] = s.Convert.OutputFormat
		c["scratch_dir"] = s.Convert.ScratchDir
		c["max_concurrent_jobs"] = strconv.Itoa(s.Convert.MaxConcurrentJobs)
		c["max_virtual_size"] = strconv.FormatInt(s.Convert.MaxVirtualSize, 10)
		c["max_attempts"] = strconv.Itoa(s.Convert.MaxAttempts)
		c["retry_backoff"] = s.Convert.RetryBackoff.String()
		c["ack_wait"] = s.Convert.AckWait.String()
	case events.FunctionNotify:
		c["notify_on"] = strings.Join(s.Notify.NotifyOn, ",")
		var ch []string
		for _, x := range []struct{ name, set string }{
			{"slack", s.Notify.SlackWebhookURL + s.Notify.SlackToken},
			{"discord", s.Notify.DiscordWebhookURL},
			{"webhook", s.Notify.WebhookURL},
			{"email", s.Notify.SMTPAddr},
		} {
			if x.set != "" {
				ch = append(ch, x.name)
			}
		}
		c["channels"] = strings.Join(ch, ",")
	}
	for k, v := range c {
		if v == "" {
			c[k] = "none"
		}
	}
	return c
}

func setOrNone(v string) string {
	if v == "" {
		return "none"
	}
	return "set"
}

// logStatsOnSignal logs each replica's statistics, and the fleet's from
// the results stream, whenever the process gets SIGUSR1.
func logStatsOnSignal(nc *nats.Conn, svcs []*control.Service, log *slog.Logger) (stop func()) {
	sig := make(chan os.Signal, 1)
	notifyStatsSignal(sig)
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case <-done:
				return
			case <-sig:
				logStats(nc, svcs, log)
			}
		}
	})
	return func() {
		signal.Stop(sig)
		close(done)
		wg.Wait()
	}
}

func logStats(nc *nats.Conn, svcs []*control.Service, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, svc := range svcs {
		st := svc.Stats(ctx)
		log.Info("replica stats", "function", st.Function, "instance", st.Instance, "state", st.State,
			"in_flight", st.InFlight, "uptime", time.Duration(st.UptimeSeconds)*time.Second,
			"handled", st.Counts.Handled, "acked", st.Counts.Acked, "retried", st.Counts.Retried,
			"terminated", st.Counts.Terminated, "cancelled", st.Counts.Cancelled, "aborted", st.Counts.Aborted,
			"queue_pending", st.QueuePending, "queue_ack_pending", st.QueueAckPending)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return
	}
	r, err := fleet.ReadResults(ctx, js)
	if err != nil {
		log.Warn("fleet stats not read", "err", err)
		return
	}
	log.Info("fleet stats", "processed", r.Processed, "converted", r.Converted, "duplicates", r.Duplicates,
		"failed", r.Failed, "cancelled", r.Cancelled, "retried", r.Retried,
		"success_rate", fmt.Sprintf("%.1f%%", 100*r.SuccessRate),
		"avg", seconds(r.AvgSeconds), "p50", seconds(r.P50Seconds), "p95", seconds(r.P95Seconds),
		"bytes_in", r.BytesIn, "bytes_out", r.BytesOut)
}

func seconds(s float64) time.Duration {
	return time.Duration(s * float64(time.Second)).Round(time.Millisecond)
}
