package metrics_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/metrics"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/natstest"
)

func startJetStream(t *testing.T) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, js := natstest.Start(t)
	ctx := context.Background()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "WORK", Subjects: []string{"work.>"}, Retention: jetstream.WorkQueuePolicy}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: events.StreamResults, Subjects: []string{events.SubjectResults}}); err != nil {
		t.Fatal(err)
	}
	return nc, js
}

// scrape fetches /metrics and parses it as Prometheus would.
func scrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/metrics: %s", resp.Status)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("/metrics does not parse: %v", err)
	}
	return fams
}

// value is the value of the series of name whose labels include want, and
// whether there is one.
func value(fams map[string]*dto.MetricFamily, name string, want map[string]string) (float64, bool) {
	f := fams[name]
	if f == nil {
		return 0, false
	}
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		}
	}
	return 0, false
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestMetricsFollowJobsOfTheWorkerTheyWatch(t *testing.T) {
	nc, js := startJetStream(t)
	release := make(chan struct{})
	w, err := natsrt.NewWorker(context.Background(), js, natsrt.Binding{
		Stream: "WORK", Durable: "convert", FilterSubject: "work.>",
		Describe: func(data []byte) events.JobRef {
			return events.JobRef{ID: string(data), Bucket: "uploads", Key: "disks/" + string(data)}
		},
	}, func(_ context.Context, data []byte, _ natsrt.Delivery) ([]events.Message, error) {
		job := string(data)
		p, _ := json.Marshal(events.Progress{JobID: job, Phase: events.PhaseConvert, Percent: 42})
		_ = nc.Publish(events.ProgressSubject(job), p)
		<-release
		ev, _ := events.New("ev-"+job, events.TypeConverted, "/test", job, time.Now(), events.Converted{
			JobID: job, InputFormat: "vhdx", InputSize: 10, OutputSize: 64, DurationMS: 2500, ZeroFraction: 0.75,
		})
		return []events.Message{{Subject: events.SubjectConverted, Event: ev}}, nil
	}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = w.Run(ctx, context.Background()); close(done) }()
	t.Cleanup(func() { cancel(); <-done })

	m := metrics.New("0.1.0", nc)
	defer m.Follow("convert", w)()
	m.RecordDelivery("slack", "delivered")
	srv, err := metrics.Serve("127.0.0.1:0", m.Handler(
		metrics.NATSCheck(nc),
		metrics.ConsumerCheck("convert", w, func() bool { return w.State() == events.WorkerRunning }),
	), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()

	eventually(t, "worker bound", func() bool { code, _ := get(t, "http://"+srv.Addr()+"/readyz"); return code == 200 })
	if code, _ := get(t, "http://"+srv.Addr()+"/healthz"); code != 200 {
		t.Errorf("/healthz = %d", code)
	}

	if _, err := js.Publish(context.Background(), "work.a", []byte("job-1")); err != nil {
		t.Fatal(err)
	}
	running := map[string]string{"job_id": "job-1", "key": "disks/job-1"}
	eventually(t, "progress gauge at 42", func() bool {
		v, ok := value(scrape(t, srv.Addr()), "imagepipe_conversion_progress_percent", running)
		return ok && v == 42
	})
	fams := scrape(t, srv.Addr())
	if v, _ := value(fams, "imagepipe_jobs_in_flight", map[string]string{"function": "convert"}); v != 1 {
		t.Errorf("in flight = %v, want 1", v)
	}
	if v, _ := value(fams, "imagepipe_queue_depth", map[string]string{"function": "convert"}); v != 1 {
		t.Errorf("queue depth = %v, want 1 (the job held)", v)
	}
	if v, _ := value(fams, "imagepipe_jobs_total", map[string]string{"outcome": "converted", "format": "vhdx"}); v != 0 {
		t.Errorf("jobs counted before any ended: %v", v)
	}

	close(release)
	eventually(t, "converted job counted", func() bool {
		v, _ := value(scrape(t, srv.Addr()), "imagepipe_jobs_total", map[string]string{"outcome": "converted", "format": "vhdx"})
		return v == 1
	})
	fams = scrape(t, srv.Addr())
	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"imagepipe_messages_total", map[string]string{"function": "convert", "outcome": "acked"}, 1},
		{"imagepipe_job_duration_seconds", map[string]string{"outcome": "converted"}, 1},
		{"imagepipe_input_bytes_total", nil, 10},
		{"imagepipe_output_bytes_total", nil, 64},
		{"imagepipe_output_zero_bytes_total", nil, 48},
		{"imagepipe_notifications_total", map[string]string{"channel": "slack", "outcome": "delivered"}, 1},
		{"imagepipe_build_info", map[string]string{"version": "0.1.0"}, 1},
	} {
		if v, ok := value(fams, c.name, c.labels); !ok || v != c.want {
			t.Errorf("%s%v = %v (present %v), want %v", c.name, c.labels, v, ok, c.want)
		}
	}
	if _, ok := value(fams, "imagepipe_conversion_progress_percent", running); ok {
		t.Error("the progress series of a finished job is still there")
	}
	for name := range fams {
		if !strings.HasPrefix(name, "imagepipe_") && !strings.HasPrefix(name, "go_") && !strings.HasPrefix(name, "process_") {
			t.Errorf("metric %s is not named imagepipe_*", name)
		}
	}
}

func TestReadyzSaysWhichCheckFails(t *testing.T) {
	m := metrics.New("0.1.0", nil)
	srv, err := metrics.Serve("127.0.0.1:0", m.Handler(
		metrics.Check{Name: "s3", Probe: func(context.Context) error { return errors.New("connection refused") }},
	), slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	code, body := get(t, "http://"+srv.Addr()+"/readyz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "s3: connection refused") {
		t.Errorf("/readyz = %d %q", code, body)
	}
	if code, _ := get(t, "http://"+srv.Addr()+"/healthz"); code != 200 {
		t.Errorf("/healthz = %d; a process that answers is alive", code)
	}
}
