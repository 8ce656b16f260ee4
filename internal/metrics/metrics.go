package metrics

import (
	"context"
	"encoding/json"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/natsrt"
)

// Worker is the part of a runtime worker the metrics follow.
type Worker interface {
	Observe(natsrt.Observer) (remove func())
	InFlight() int64
	Consumer(ctx context.Context) (*jetstream.ConsumerInfo, error)
}

var _ Worker = (*natsrt.Worker)(nil)

// Metrics holds one process's Prometheus metrics.
//
// Job outcomes are taken from the runtime worker, which sees every message
// this process handles and the result events its handler returns, rather
// than from the RESULTS stream. A process counts only its own work, so
// Prometheus sums replicas without counting any job twice, and a counter
// moves the moment the work is done. The fleet's durable history is the
// stream, read by `imagepipe ctl stats`.
type Metrics struct {
	reg *prometheus.Registry

	messages   *prometheus.CounterVec
	jobs       *prometheus.CounterVec
	duration   *prometheus.HistogramVec
	bytesIn    prometheus.Counter
	bytesOut   prometheus.Counter
	zeroOut    prometheus.Counter
	progress   *prometheus.GaugeVec
	deliveries *prometheus.CounterVec

	nc *nats.Conn

	mu      sync.Mutex
	workers map[string]Worker
	running map[string]*followed // by job id
}

// followed is a running job whose progress the gauge shows.
type followed struct {
	labels prometheus.Labels
	sub    *nats.Subscription
}

// New returns the metrics of one process. nc, if not nil, is used to
// follow the progress of the jobs this process runs.
func New(version string, nc *nats.Conn) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		nc:  nc,
		messages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imagepipe_messages_total",
			Help: "Messages handled, by function and what the runtime did with them (acked, retried, terminated, cancelled, aborted).",
		}, []string{"function", "outcome"}),
		jobs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imagepipe_jobs_total",
			Help: "Conversion results published by this process, by outcome (converted, duplicate, failed, retried, cancelled) and input format.",
		}, []string{"outcome", "format"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "imagepipe_job_duration_seconds",
			Help:    "Time from a job's start to its result, by outcome.",
			Buckets: []float64{1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200},
		}, []string{"outcome"}),
		bytesIn: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagepipe_input_bytes_total",
			Help: "Bytes of input images converted.",
		}),
		bytesOut: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagepipe_output_bytes_total",
			Help: "Bytes of output images written.",
		}),
		zeroOut: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "imagepipe_output_zero_bytes_total",
			Help: "Bytes of output images that were runs of zeros copied server-side from the zero object instead of sent; divided by imagepipe_output_bytes_total, the part of the outputs uploads never carried.",
		}),
		progress: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "imagepipe_conversion_progress_percent",
			Help: "Progress of each conversion running in this process; the series goes away when the job ends.",
		}, []string{"job_id", "bucket", "key"}),
		deliveries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "imagepipe_notifications_total",
			Help: "Notification deliveries, by channel and outcome (delivered, refused, retry).",
		}, []string{"channel", "outcome"}),
		workers: map[string]Worker{},
		running: map[string]*followed{},
	}
	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "imagepipe_build_info",
		Help: "Always 1; the version label says which build runs.",
	}, []string{"version"})
	build.WithLabelValues(version).Set(1)
	m.reg.MustRegister(m.messages, m.jobs, m.duration, m.bytesIn, m.bytesOut, m.zeroOut, m.progress, m.deliveries, build,
		&workerCollector{m: m},
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Registry is where the metrics live, for a handler or a test.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// Follow counts the work of function's worker until the returned func is
// called.
func (m *Metrics) Follow(function string, w Worker) (stop func()) {
	m.mu.Lock()
	m.workers[function] = w
	m.mu.Unlock()
	remove := w.Observe(&observer{m: m, function: function})
	return func() {
		remove()
		m.mu.Lock()
		delete(m.workers, function)
		m.mu.Unlock()
	}
}

// RecordDelivery counts one notification delivery attempt on channel with
// outcome "delivered", "refused" (permanently, not retried) or "retry".
func (m *Metrics) RecordDelivery(channel, outcome string) {
	m.deliveries.WithLabelValues(channel, outcome).Inc()
}

type observer struct {
	m        *Metrics
	function string
}

func (o *observer) Started(j events.JobInfo) {
	if j.ID == "" {
		return
	}
	o.m.follow(j)
}

func (o *observer) Finished(f natsrt.Finished) {
	m := o.m
	m.messages.WithLabelValues(o.function, string(f.Outcome)).Inc()
	if f.Job.ID != "" {
		m.unfollow(f.Job.ID)
	}
	if f.Outcome == natsrt.OutcomeAborted {
		return // nothing was published; the job runs again elsewhere
	}
	counted := false
	inputs := map[string]bool{}
	for _, msg := range f.Events {
		switch msg.Event.Type {
		case events.TypeConverted:
			var c events.Converted
			if msg.Event.DecodeData(events.TypeConverted, &c) != nil {
				continue
			}
			outcome := "converted"
			if c.DuplicateOf != "" {
				outcome = "duplicate"
			}
			m.jobs.WithLabelValues(outcome, format(c.InputFormat)).Inc()
			m.duration.WithLabelValues(outcome).Observe(float64(c.DurationMS) / 1000)
			if !inputs[c.JobID] {
				inputs[c.JobID] = true
				m.bytesIn.Add(float64(c.InputSize))
			}
			m.bytesOut.Add(float64(c.OutputSize))
			m.zeroOut.Add(float64(c.ZeroBytes()))
			counted = true
		case events.TypeFailed:
			var fl events.Failed
			if msg.Event.DecodeData(events.TypeFailed, &fl) != nil {
				continue
			}
			outcome := "failed"
			switch {
			case fl.Rule == events.RuleCancelled || f.Outcome == natsrt.OutcomeCancelled:
				outcome = "cancelled"
			case fl.WillRetry:
				outcome = "retried"
			}
			m.jobs.WithLabelValues(outcome, format(fl.InputFormat)).Inc()
			m.duration.WithLabelValues(outcome).Observe(float64(fl.DurationMS) / 1000)
			counted = true
		}
	}
	if !counted && f.Outcome == natsrt.OutcomeCancelled {
		m.jobs.WithLabelValues("cancelled", format("")).Inc()
	}
}

func format(f string) string {
	if f == "" {
		return "unknown"
	}
	return f
}

// follow shows a running job's conversion progress, which its handler
// publishes on the job's progress subject.
func (m *Metrics) follow(j events.JobInfo) {
	labels := prometheus.Labels{"job_id": j.ID, "bucket": j.Bucket, "key": j.Key}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.running[j.ID]; ok {
		return
	}
	f := &followed{labels: labels}
	m.running[j.ID] = f
	m.progress.With(labels).Set(0)
	if m.nc == nil {
		return
	}
	sub, err := m.nc.Subscribe(events.ProgressSubject(j.ID), func(msg *nats.Msg) {
		var p events.Progress
		if json.Unmarshal(msg.Data, &p) != nil || p.Phase != events.PhaseConvert {
			return
		}
		m.mu.Lock()
		defer m.mu.Unlock()
		// A report may arrive after the job ended; it must not bring the
		// series back.
		if m.running[j.ID] == f {
			m.progress.With(labels).Set(p.Percent)
		}
	})
	if err == nil {
		f.sub = sub
	}
}

func (m *Metrics) unfollow(id string) {
	m.mu.Lock()
	f := m.running[id]
	delete(m.running, id)
	if f != nil {
		m.progress.Delete(f.labels)
	}
	m.mu.Unlock()
	if f != nil && f.sub != nil {
		_ = f.sub.Unsubscribe()
	}
}

// workerCollector reports what is only known when asked: the jobs in
// flight and the queue in front of each consumer.
type workerCollector struct{ m *Metrics }

var (
	inFlightDesc = prometheus.NewDesc("imagepipe_jobs_in_flight",
		"Messages this process is handling now, by function.", []string{"function"}, nil)
	queueDesc = prometheus.NewDesc("imagepipe_queue_depth",
		"Messages waiting for or held by the function's consumer (pending plus unacknowledged), the same for every replica.", []string{"function"}, nil)
)

func (c *workerCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- inFlightDesc
	ch <- queueDesc
}

func (c *workerCollector) Collect(ch chan<- prometheus.Metric) {
	c.m.mu.Lock()
	workers := make(map[string]Worker, len(c.m.workers))
	for k, v := range c.m.workers {
		workers[k] = v
	}
	c.m.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	for fn, w := range workers {
		ch <- prometheus.MustNewConstMetric(inFlightDesc, prometheus.GaugeValue, float64(w.InFlight()), fn)
		// Without JetStream there is no depth to report; /readyz says why.
		if info, err := w.Consumer(ctx); err == nil {
			ch <- prometheus.MustNewConstMetric(queueDesc, prometheus.GaugeValue, float64(info.NumPending)+float64(info.NumAckPending), fn)
		}
	}
}
