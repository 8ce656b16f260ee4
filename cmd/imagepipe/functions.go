package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/caarlos0/env/v11"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/convert"
	"github.com/imagepipe/imagepipe/functions/ingest"
	"github.com/imagepipe/imagepipe/functions/notify"
	"github.com/imagepipe/imagepipe/internal/control"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/metrics"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/setup"
	"github.com/imagepipe/imagepipe/internal/status"
)

// settings is what every function reads from the environment.
type settings struct {
	NATS    natsrt.Config
	S3      objstore.Config
	Streams setup.StreamConfig
	Buckets setup.BucketConfig
	Ingest  ingest.Config
	Convert convert.Config
	Notify  notify.Config
	Metrics metrics.Config
}

func loadSettings() (settings, error) {
	var s settings
	if err := env.Parse(&s); err != nil {
		return s, fmt.Errorf("configuration: %w", err)
	}
	return s, nil
}

// checkOutputLayout refuses, before anything starts, a layout in which a
// conversion could overwrite an upload, and gives ingest and convert the
// output prefix in one form.
func (s *settings) checkOutputLayout() error {
	prefix, err := ingest.OutputLayout(s.Ingest.InputBucket, s.Convert.OutputBucket, s.Convert.OutputPrefix)
	if err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	s.Ingest.OutputPrefix, s.Convert.OutputPrefix = prefix, prefix
	return nil
}

// runFunction runs one function as a long-lived service.
func runFunction(ctx, jobCtx context.Context, name string, log *slog.Logger) error {
	s, err := loadSettings()
	if err != nil {
		return err
	}
	if name == "ingest" || name == "convert" {
		if err := s.checkOutputLayout(); err != nil {
			return err
		}
	}
	log = log.With("function", name)
	nc, err := natsrt.Connect(ctx, s.NATS, name, log)
	if err != nil {
		return err
	}
	defer nc.Close()
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
	if err := setup.Streams(ctx, js, s.Streams); err != nil {
		return nil, err
	}
	kv, err := setup.StatusKV(ctx, js, s.Streams.Replicas)
	if err != nil {
		return nil, err
	}
	st := status.New(kv, nc)

	switch name {
	case "ingest":
		return startIngest(ctx, js, st, s, log)
	case "convert":
		return startConvert(ctx, js, st, s, log)
	case "notify":
		if err := s.Notify.CheckSecrets(); err != nil {
			return nil, err
		}
		return startNotify(ctx, js, s, m.RecordDelivery, log)
	}
	return nil, fmt.Errorf("unknown function %q", name)
}

func decode(data []byte, typ string, v any) error {
	ev, err := events.Decode(data)
	if err == nil {
		err = ev.DecodeData(typ, v)
	}
	if err != nil {
		return failure.Permanent(events.PhaseIntake, err, "")
	}
	return nil
}

func provisionBuckets(ctx context.Context, s settings) error {
	store, err := objstore.New(s.S3)
	if err != nil {
		return err
	}
	if err := setup.Buckets(ctx, store.Client(), s.Ingest.InputBucket, s.Convert.OutputBucket); err != nil {
		return err
	}
	if s.Buckets.NotifyTarget == "" {
		return nil
	}
	return setup.Notification(ctx, store.Client(), s.Ingest.InputBucket, s.Buckets.NotifyTarget)
}

// describeConvertJob names the input of a convert message for the runtime,
// so that `imagepipe ctl cancel BUCKET/KEY` finds the job running it and
// metrics can follow its progress.
func describeConvertJob(data []byte) natsrt.JobRef {
	var job events.ConvertJob
	if decode(data, events.TypeConvertJob, &job) != nil {
		return natsrt.JobRef{}
	}
	return natsrt.JobRef{ID: job.JobID, Bucket: job.Bucket, Key: job.Key}
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
			case natsrt.StateRunning, natsrt.StatePaused, natsrt.StateDraining:
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
	if _, ok := workers["ingest"]; ok {
		buckets = append(buckets, s.Ingest.InputBucket)
	}
	if _, ok := workers["convert"]; ok {
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
		"nats_url":        redactURLs(s.NATS.URL),
		"nats_creds":      setOrNone(s.NATS.Creds),
		"stream_replicas": strconv.Itoa(s.Streams.Replicas),
		"metrics_addr":    s.Metrics.Addr,
	}
	switch name {
	case "ingest":
		c["s3_endpoint"] = s.S3.Endpoint
		c["input_bucket"] = s.Ingest.InputBucket
		c["output_prefix"] = s.Ingest.OutputPrefix
	case "convert":
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
	case "notify":
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

// redactURLs drops user information from a comma-separated list of URLs.
func redactURLs(list string) string {
	parts := strings.Split(list, ",")
	for i, p := range parts {
		u, err := url.Parse(strings.TrimSpace(p))
		if err != nil {
			parts[i] = "(unparsable)"
			continue
		}
		if u.User != nil {
			u.User = url.User("redacted")
		}
		parts[i] = u.String()
	}
	return strings.Join(parts, ",")
}

// logStatsOnSignal logs each replica's statistics, and the fleet's from
// the results stream, whenever the process gets SIGUSR1.
func logStatsOnSignal(nc *nats.Conn, svcs []*control.Service, log *slog.Logger) (stop func()) {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGUSR1)
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
	r, err := control.ReadResults(ctx, js)
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
