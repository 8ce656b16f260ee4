package infra

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"
	"sigs.k8s.io/yaml"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/setup"
	"github.com/imagepipe/imagepipe/test/stack"
)

// What KEDA's NATS JetStream scaler reads, as kedacore/keda's
// pkg/scalers/nats_jetstream_scaler.go has it (main at 8b4f083ca8c8, after
// v2.20.1). A ScaledObject trigger of type nats-jetstream with metadata
// natsServerMonitoringEndpoint (host:port, no scheme), account, stream,
// consumer, lagThreshold (default 10), activationLagThreshold (default 0)
// and useHttps (default false) makes the scaler:
//
//   - GET <scheme>://<natsServerMonitoringEndpoint>/jsz?acc=<account>&config=true&consumers=true
//     (getNATSJetStreamMonitoringURL), with no credentials;
//   - find the account whose id or name is <account> (IsAccount), in it the
//     stream named <stream>, in that the consumer named <consumer>;
//   - take num_pending + num_ack_pending of that consumer as the lag
//     (getMaxMsgLag), which it scales on, and call the target active while
//     lag > activationLagThreshold (GetMetricsAndActivity);
//   - fail when the consumer is not there ("consumer %q not found in stream
//     %q"). With no fallback, KEDA neither scales a target up from zero nor
//     down while its trigger fails (pkg/scaling/executor
//     scale_scaledobjects.go), so the durable consumer must exist before
//     the function is first scaled to zero.
//
// The types below keep exactly the JSON names the scaler decodes, so that
// a monitoring endpoint that renamed one reads as a lag of 0 here as it
// would there, and the test fails.
type kedaJSZ struct {
	Accounts []struct {
		ID      string `json:"id"`
		Name    string `json:"name"`
		Streams []struct {
			Name  string `json:"name"`
			State struct {
				MsgCount int64 `json:"messages"`
			} `json:"state"`
			Consumers []struct {
				Name          string `json:"name"`
				NumAckPending int    `json:"num_ack_pending"`
				NumPending    int    `json:"num_pending"`
			} `json:"consumer_detail"`
		} `json:"stream_detail"`
	} `json:"account_details"`
	MetaCluster struct {
		ClusterSize int `json:"cluster_size"`
	} `json:"meta_cluster"`
}

// kedaTrigger is the scaler metadata a ScaledObject gives for one function.
type kedaTrigger struct {
	Endpoint, Account, Stream, Consumer  string
	LagThreshold, ActivationLagThreshold int64
}

// scaledObjects is the file whose triggers the tests read, so that a
// stream, consumer or account renamed there is read here as KEDA would.
const scaledObjects = "../deploy/kubernetes/base/scaledobjects.yaml"

// scaledObjectTrigger is the nats-jetstream trigger of the named
// ScaledObject, with its monitoring endpoint pointed at the test's server.
func scaledObjectTrigger(t *testing.T, name, endpoint string) kedaTrigger {
	t.Helper()
	b, err := os.ReadFile(scaledObjects)
	if err != nil {
		t.Fatal(err)
	}
	for doc := range strings.SplitSeq(string(b), "\n---\n") {
		var so struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name string `json:"name"`
			} `json:"metadata"`
			Spec struct {
				Triggers []struct {
					Type     string            `json:"type"`
					Metadata map[string]string `json:"metadata"`
				} `json:"triggers"`
			} `json:"spec"`
		}
		if err := yaml.Unmarshal([]byte(doc), &so); err != nil {
			t.Fatalf("%s: %v", scaledObjects, err)
		}
		if so.Kind != "ScaledObject" || so.Metadata.Name != name {
			continue
		}
		for _, tr := range so.Spec.Triggers {
			if tr.Type != "nats-jetstream" {
				continue
			}
			m := tr.Metadata
			// The scaler's defaults for what a trigger leaves out.
			k := kedaTrigger{Endpoint: endpoint, Account: m["account"], Stream: m["stream"], Consumer: m["consumer"], LagThreshold: 10}
			for key, p := range map[string]*int64{"lagThreshold": &k.LagThreshold, "activationLagThreshold": &k.ActivationLagThreshold} {
				if v, ok := m[key]; ok {
					if *p, err = strconv.ParseInt(v, 10, 64); err != nil {
						t.Fatalf("%s: %s: %s %q: %v", scaledObjects, name, key, v, err)
					}
				}
			}
			return k
		}
		t.Fatalf("%s: %s has no nats-jetstream trigger", scaledObjects, name)
	}
	t.Fatalf("%s: no ScaledObject %s", scaledObjects, name)
	return kedaTrigger{}
}

// replicas is what the HPA KEDA feeds asks for at a reading, before the
// ScaledObject's minimum and maximum: ceil(lag / lagThreshold).
func (k kedaTrigger) replicas(r kedaReading) int64 {
	return (r.Lag + k.LagThreshold - 1) / k.LagThreshold
}

// monitoringURL is getNATSJetStreamMonitoringURL with useHttps false.
func (k kedaTrigger) monitoringURL() string {
	params := url.Values{}
	params.Set("acc", k.Account)
	params.Set("consumers", "true")
	params.Set("config", "true")
	u := url.URL{Scheme: "http", Host: k.Endpoint, Path: "/jsz", RawQuery: params.Encode()}
	return u.String()
}

// kedaReading is one poll of the scaler: the lag it scales on, whether it
// would call the target active, and the two counts the lag sums plus the
// stream's message count, for the failure messages.
type kedaReading struct {
	Lag, Pending, AckPending int64
	Active                   bool
	StreamMessages           int64
}

func (r kedaReading) String() string {
	return fmt.Sprintf("lag %d (num_pending %d + num_ack_pending %d), active %t, stream holds %d",
		r.Lag, r.Pending, r.AckPending, r.Active, r.StreamMessages)
}

// read does what the scaler does on a single server (cluster_size under 2,
// so it asks no other node for the consumer's leader).
func (k kedaTrigger) read(ctx context.Context) (kedaReading, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, k.monitoringURL(), nil)
	if err != nil {
		return kedaReading{}, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return kedaReading{}, err
	}
	defer resp.Body.Close()
	var jsz kedaJSZ
	if err := json.NewDecoder(resp.Body).Decode(&jsz); err != nil {
		return kedaReading{}, fmt.Errorf("decode %s: %w", k.monitoringURL(), err)
	}
	if jsz.MetaCluster.ClusterSize > 1 {
		return kedaReading{}, fmt.Errorf("cluster of %d: the scaler would look for the consumer's leader", jsz.MetaCluster.ClusterSize)
	}
	for _, acc := range jsz.Accounts {
		if acc.ID != k.Account && acc.Name != k.Account {
			continue
		}
		for _, st := range acc.Streams {
			if st.Name != k.Stream {
				continue
			}
			for _, c := range st.Consumers {
				if c.Name == k.Consumer {
					r := kedaReading{
						Pending: int64(c.NumPending), AckPending: int64(c.NumAckPending),
						Lag: int64(c.NumPending + c.NumAckPending), StreamMessages: st.State.MsgCount,
					}
					r.Active = r.Lag > k.ActivationLagThreshold
					return r, nil
				}
			}
			return kedaReading{}, fmt.Errorf("consumer %q not found in stream %q", k.Consumer, k.Stream)
		}
	}
	return kedaReading{}, errors.New("stream not found")
}

// waitFor polls the scaler's view until want holds of it, and fails with
// the last reading when it does not within a deadline.
func (k kedaTrigger) waitFor(t *testing.T, what string, want func(kedaReading) bool) kedaReading {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(20*time.Second))
	defer cancel()
	var last kedaReading
	var lastErr error
	for {
		last, lastErr = k.read(ctx)
		if lastErr == nil && want(last) {
			return last
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s/%s: %s: never held; last reading %v, err %v", k.Stream, k.Consumer, what, last, lastErr)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// waitLag waits until the scaler sees exactly pending waiting and
// ackPending in flight.
func (k kedaTrigger) waitLag(t *testing.T, what string, pending, ackPending int64) kedaReading {
	t.Helper()
	return k.waitFor(t, fmt.Sprintf("%s: want lag %d (num_pending %d + num_ack_pending %d)", what, pending+ackPending, pending, ackPending),
		func(r kedaReading) bool {
			return r.Pending == pending && r.AckPending == ackPending && r.Lag == pending+ackPending && r.Active == (r.Lag > k.ActivationLagThreshold)
		})
}

// releaseOneByOne lets held jobs finish one at a time, from left down to
// none, and waits after each until the scaler sees the lag one less.
func (k kedaTrigger) releaseOneByOne(t *testing.T, what string, release chan<- struct{}, left int64) {
	t.Helper()
	for left > 0 {
		release <- struct{}{}
		left--
		k.waitFor(t, fmt.Sprintf("%s: want lag %d", what, left), func(r kedaReading) bool { return r.Lag == left })
	}
}

// heldWorker makes the function's durable consumer, as its binding does at
// start, with a handler that holds each message until the test sends on
// the returned channel, so that the test decides what is in flight.
func heldWorker(ctx context.Context, t *testing.T, js jetstream.JetStream, b natsrt.Binding) (*natsrt.Worker, chan<- struct{}) {
	t.Helper()
	release := make(chan struct{})
	w, err := natsrt.NewWorker(ctx, js, b, func(ctx context.Context, _ []byte, _ natsrt.Delivery) ([]events.Message, error) {
		select {
		case <-release:
			return nil, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	return w, release
}

// monitoredTrigger runs the project's NATS with its monitoring listener
// on, and reads the named ScaledObject's trigger pointed at it.
func monitoredTrigger(t *testing.T, scaledObject string) (*server.Options, kedaTrigger) {
	t.Helper()
	opts, endpoint := startMonitoredNATS(t)
	return opts, scaledObjectTrigger(t, scaledObject, endpoint)
}

// startMonitoredNATS runs single.conf with its monitoring listener on, on
// loopback as the file has it but on a free port.
func startMonitoredNATS(t *testing.T) (*server.Options, string) {
	t.Helper()
	opts, err := LoadNATS(NATSNode{Config: "nats/single.conf", StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if !loopbackHost(opts.HTTPHost) {
		t.Fatalf("single.conf serves monitoring on %q, want loopback", opts.HTTPHost)
	}
	opts.HTTPPort = -1 // LoadNATS turns monitoring off; any free port
	s, err := StartNATS(opts, &ServerLog{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Shutdown)
	addr := s.MonitorAddr()
	if addr == nil {
		t.Fatal("monitoring listener did not start")
	}
	admin := userConn(t, opts, "admin")
	js, err := jetstream.New(admin.Conn)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(30*time.Second))
	defer cancel()
	if _, err := setup.JetStream(ctx, js, setup.StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	return opts, net.JoinHostPort(opts.HTTPHost, strconv.Itoa(addr.Port))
}

func userJS(t *testing.T, opts *server.Options, user string) jetstream.JetStream {
	t.Helper()
	js, err := jetstream.New(userConn(t, opts, user).Conn)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// runWorker runs w until the test ends and waits for it to return.
func runWorker(t *testing.T, w *natsrt.Worker) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx, ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("worker: %v", err)
		}
	})
}

// The convert queue's lag as KEDA computes it from the monitoring
// endpoint of the project's own NATS config: every queued job while no
// replica runs, in-flight jobs included while replicas convert (so that
// scaling in never counts a running conversion as done), the backlog a
// paused replica leaves, one less per finished job, and 0 once drained.
func TestKEDALagOfTheConvertQueueIsItsJobsWaitingAndInFlight(t *testing.T) {
	const jobs, concurrency = 6, 2
	opts, keda := monitoredTrigger(t, "imagepipe-convert")
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(60*time.Second))
	defer cancel()

	// Before convert first starts there is no consumer to read: the scaler
	// fails instead of reading a lag.
	if r, err := keda.read(ctx); err == nil || err.Error() != `consumer "convert" not found in stream "JOBS"` {
		t.Fatalf("before convert ever ran: reading %v, err %v; want the scaler's consumer-not-found error", r, err)
	}

	// convert creates its durable consumer at start, as production's
	// binding does; each job waits for the test to let it finish.
	w, finish := heldWorker(ctx, t, userJS(t, opts, "convert"), natsrt.Binding{
		Stream: events.StreamJobs, Durable: "convert", FilterSubject: events.SubjectConvertJob,
		Concurrency: concurrency, AckWait: time.Minute, MaxAttempts: 3,
	})
	keda.waitLag(t, "consumer created, nothing queued", 0, 0)

	// ingest queues the jobs while no replica runs: scaled to zero.
	ingest := userJS(t, opts, "ingest")
	for i := range jobs {
		id := fmt.Sprintf("job-%d", i)
		if _, err := ingest.Publish(ctx, events.SubjectConvertJob, []byte(`{"job_id":"`+id+`"}`), jetstream.WithMsgID(id)); err != nil {
			t.Fatalf("queue %s: %v", id, err)
		}
	}
	if r := keda.waitLag(t, "queued, no replica", jobs, 0); !r.Active {
		t.Fatalf("queued, no replica: %v; want active, to scale from zero", r)
	}

	// A replica takes as many as it runs at once; the lag stays whole.
	runWorker(t, w)
	if r := keda.waitLag(t, "replica converting", jobs-concurrency, concurrency); keda.replicas(r) != jobs/concurrency {
		t.Fatalf("converting: %v asks for %d replicas, want %d: one per IMAGEPIPE_MAX_CONCURRENT_JOBS (%d) jobs", r, keda.replicas(r), jobs/concurrency, concurrency)
	}

	// Each finished job is one less.
	finish <- struct{}{}
	left := int64(jobs - 1)
	keda.waitLag(t, "one done", left-concurrency, concurrency)

	// Paused: the jobs in flight finish, the rest stay waiting, and the
	// scaler still sees them.
	w.Pause()
	for range concurrency {
		finish <- struct{}{}
		left--
	}
	if r := keda.waitLag(t, "paused, in-flight jobs finished", left, 0); !r.Active {
		t.Fatalf("paused with %d waiting: %v; want active", left, r)
	}
	// The server has the acks; the worker counts a job done only once its
	// ack's reply is in, a moment later.
	for deadline := time.Now().Add(stack.Scaled(20 * time.Second)); w.InFlight() != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("paused: %d jobs in flight after their acks", w.InFlight())
		}
	}

	// Resumed: one less per finished job, down to 0 and inactive, which
	// lets KEDA scale convert to zero.
	w.Resume()
	keda.releaseOneByOne(t, "resumed", finish, left)
	r := keda.waitLag(t, "drained", 0, 0)
	if r.Active || r.StreamMessages != 0 {
		t.Fatalf("drained: %v; want inactive and the work queue empty", r)
	}
}

// ingest's lag is its consumer's, not the S3_EVENTS stream's depth: the
// stream keeps every notification for a week, the lag is what ingest has
// not yet handled.
func TestKEDALagOfTheIngestQueueIsItsUnhandledNotifications(t *testing.T) {
	const notifications = 4
	opts, keda := monitoredTrigger(t, "imagepipe-ingest")
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(60*time.Second))
	defer cancel()

	w, err := natsrt.NewWorker(ctx, userJS(t, opts, "ingest"), natsrt.Binding{
		Stream: events.StreamS3Events, Durable: "ingest", FilterSubject: events.SubjectS3Events,
		Concurrency: 4, AckWait: 30 * time.Second, MaxAttempts: 5,
	}, func(context.Context, []byte, natsrt.Delivery) ([]events.Message, error) { return nil, nil },
		slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	minio := userJS(t, opts, "minio")
	for i := range notifications {
		body := fmt.Sprintf(`{"EventName":"s3:ObjectCreated:Put","Key":"uploads/disk-%d.vmdk"}`, i)
		if _, err := minio.Publish(ctx, events.SubjectS3Events, []byte(body)); err != nil {
			t.Fatalf("notification %d: %v", i, err)
		}
	}
	if r := keda.waitLag(t, "notified, no replica", notifications, 0); !r.Active {
		t.Fatalf("notified, no replica: %v; want active", r)
	}

	runWorker(t, w)
	r := keda.waitLag(t, "handled", 0, 0)
	if r.Active || r.StreamMessages != notifications {
		t.Fatalf("handled: %v; want inactive while the stream still holds all %d", r, notifications)
	}
}

// notify's lag is its consumer's on RESULTS: results and alerts it has not
// yet delivered, plus those it is delivering (a webhook that hangs keeps
// its message unacknowledged, and counts). The stream keeps the results
// after notify has sent them, for `imagepipe ctl stats` and users.
func TestKEDALagOfTheNotifyQueueIsItsUndeliveredResults(t *testing.T) {
	const results, concurrency = 7, 4
	opts, keda := monitoredTrigger(t, "imagepipe-notify")
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(60*time.Second))
	defer cancel()

	// notify's binding: the whole stream, no filter.
	w, deliver := heldWorker(ctx, t, userJS(t, opts, "notify"), natsrt.Binding{
		Stream: events.StreamResults, Durable: "notify",
		Concurrency: concurrency, AckWait: time.Minute, MaxAttempts: 200,
	})
	keda.waitLag(t, "consumer created, nothing to send", 0, 0)

	// convert publishes results while no notify replica runs.
	convert := userJS(t, opts, "convert")
	for i := range results {
		subject := events.SubjectConverted
		if i%3 == 2 {
			subject = events.SubjectFailed
		}
		if _, err := convert.Publish(ctx, subject, []byte(fmt.Sprintf(`{"n":%d}`, i))); err != nil {
			t.Fatalf("result %d: %v", i, err)
		}
	}
	if r := keda.waitLag(t, "results, no replica", results, 0); !r.Active || keda.replicas(r) != 1 {
		t.Fatalf("results, no replica: %v asks for %d replicas; want active and 1 (lagThreshold %d)", r, keda.replicas(r), keda.LagThreshold)
	}

	// A replica delivering as many as it runs at once: the lag stays whole.
	runWorker(t, w)
	keda.waitLag(t, "delivering", results-concurrency, concurrency)
	keda.releaseOneByOne(t, "delivered one", deliver, results)
	r := keda.waitLag(t, "all sent", 0, 0)
	if r.Active || r.StreamMessages != results {
		t.Fatalf("all sent: %v; want inactive while the stream still holds all %d", r, results)
	}
}
