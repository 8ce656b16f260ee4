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
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/setup"
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
	Endpoint, Account, Stream, Consumer string
	ActivationLagThreshold              int64
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
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
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
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
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
	opts, endpoint := startMonitoredNATS(t)
	keda := kedaTrigger{Endpoint: endpoint, Account: "IMAGEPIPE", Stream: events.StreamJobs, Consumer: "convert"}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	// Before convert first starts there is no consumer to read: the scaler
	// fails instead of reading a lag.
	if r, err := keda.read(ctx); err == nil || err.Error() != `consumer "convert" not found in stream "JOBS"` {
		t.Fatalf("before convert ever ran: reading %v, err %v; want the scaler's consumer-not-found error", r, err)
	}

	// convert creates its durable consumer at start, as production's
	// binding does; each job waits for the test to let it finish.
	finish := make(chan struct{})
	w, err := natsrt.NewWorker(ctx, userJS(t, opts, "convert"), natsrt.Binding{
		Stream: events.StreamJobs, Durable: "convert", FilterSubject: events.SubjectConvertJob,
		Concurrency: concurrency, AckWait: time.Minute, MaxAttempts: 3,
	}, func(ctx context.Context, _ []byte, _ natsrt.Delivery) ([]events.Message, error) {
		select {
		case <-finish:
			return nil, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
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
	keda.waitLag(t, "replica converting", jobs-concurrency, concurrency)

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
	for deadline := time.Now().Add(20 * time.Second); w.InFlight() != 0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("paused: %d jobs in flight after their acks", w.InFlight())
		}
	}

	// Resumed: one less per finished job, down to 0 and inactive, which
	// lets KEDA scale convert to zero.
	w.Resume()
	for left > 0 {
		finish <- struct{}{}
		left--
		keda.waitFor(t, fmt.Sprintf("resumed: want lag %d", left), func(r kedaReading) bool { return r.Lag == left })
	}
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
	opts, endpoint := startMonitoredNATS(t)
	keda := kedaTrigger{Endpoint: endpoint, Account: "IMAGEPIPE", Stream: events.StreamS3Events, Consumer: "ingest"}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
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
