package control_test

import (
	"context"
	"encoding/json"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/control"
	"github.com/imagepipe/imagepipe/internal/natstest"
)

// fakeWorker stands in for a runtime worker: the control API only relays
// to it, and the runtime's own tests cover what the calls do.
type fakeWorker struct {
	mu      sync.Mutex
	state   events.WorkerState
	jobs    []events.JobInfo
	cancels []string
	steered int
	// slow, when set, holds every answer until it is closed: a replica on
	// a machine too loaded to answer in time.
	slow chan struct{}
}

var _ control.Worker = (*fakeWorker)(nil)

func (f *fakeWorker) set(s events.WorkerState) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.state = s
	f.steered++
}

// timesSteered is how many pause, resume, drain or stop requests arrived.
func (f *fakeWorker) timesSteered() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.steered
}
func (f *fakeWorker) Pause()  { f.set(events.WorkerPaused) }
func (f *fakeWorker) Resume() { f.set(events.WorkerRunning) }
func (f *fakeWorker) Drain()  { f.set(events.WorkerDraining) }
func (f *fakeWorker) Stop()   { f.set(events.WorkerStopping) }
func (f *fakeWorker) State() events.WorkerState {
	if f.slow != nil {
		<-f.slow
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.state
}
func (f *fakeWorker) InFlight() int64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return int64(len(f.jobs))
}
func (f *fakeWorker) Jobs() []events.JobInfo {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]events.JobInfo(nil), f.jobs...)
}
func (f *fakeWorker) Cancel(bucket, key string) []events.JobInfo {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cancels = append(f.cancels, bucket+"/"+key)
	var out []events.JobInfo
	for _, j := range f.jobs {
		if j.Bucket == bucket && j.Key == key {
			out = append(out, j)
		}
	}
	return out
}
func (f *fakeWorker) Counts() events.WorkerCounts {
	return events.WorkerCounts{Handled: 3, Acked: 2, Retried: 1}
}
func (f *fakeWorker) Started() time.Time { return time.Now().Add(-time.Minute) }
func (f *fakeWorker) Consumer(context.Context) (*jetstream.ConsumerInfo, error) {
	return &jetstream.ConsumerInfo{NumPending: 4, NumAckPending: 1}, nil
}

type stack struct {
	url string
	nc  *nats.Conn
	js  jetstream.JetStream
}

func startNATS(t *testing.T) stack {
	t.Helper()
	nc, js := natstest.Start(t)
	return stack{url: nc.ConnectedUrl(), nc: nc, js: js}
}

// connect is another client of the server at url, as a separate process
// would be.
func connect(t *testing.T, url string) *nats.Conn {
	t.Helper()
	nc, _ := natstest.Connect(t, url)
	return nc
}

// replica registers a control service on its own connection, as a
// separate process would.
func replica(t *testing.T, url, function string, w *fakeWorker) *control.Service {
	t.Helper()
	svc, err := control.Start(connect(t, url), control.Options{
		Function: function, Version: "0.1.0-dev", Worker: w,
		Config: map[string]string{"output_bucket": "images"},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = svc.Stop() })
	return svc
}

func TestClientGathersEveryReplicaAndSteersOneByInstance(t *testing.T) {
	s := startNATS(t)
	c1, c2, in := &fakeWorker{state: events.WorkerRunning}, &fakeWorker{state: events.WorkerRunning}, &fakeWorker{state: events.WorkerRunning}
	svc1 := replica(t, s.url, "convert", c1)
	svc2 := replica(t, s.url, "convert", c2)
	replica(t, s.url, "ingest", in)
	client := control.NewClient(s.nc, 300*time.Millisecond).FindWithin(time.Second)
	ctx := context.Background()

	all, err := client.Status(ctx, events.Functions(), "")
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 3 || all[0].Function != "ingest" || all[1].Function != "convert" || all[2].Function != "convert" {
		t.Fatalf("status of every function = %+v, want ingest then two convert replicas", all)
	}
	if all[1].Config["output_bucket"] != "images" || all[1].UptimeSeconds < 59 || all[1].Version != "0.1.0-dev" {
		t.Errorf("status = %+v", all[1])
	}

	conv, err := client.Status(ctx, []string{"convert"}, "")
	if err != nil {
		t.Fatal(err)
	}
	ids := map[string]bool{}
	for _, st := range conv {
		ids[st.Instance] = true
	}
	if len(conv) != 2 || !ids[svc1.ID()] || !ids[svc2.ID()] {
		t.Fatalf("convert replicas = %+v, want %s and %s", conv, svc1.ID(), svc2.ID())
	}

	paused, err := client.Steer(ctx, []string{"convert"}, events.VerbPause, svc2.ID())
	if err != nil {
		t.Fatal(err)
	}
	if len(paused) != 1 || paused[0].Instance != svc2.ID() || paused[0].State != events.WorkerPaused {
		t.Fatalf("pause of one instance answered %+v", paused)
	}
	if c1.State() != events.WorkerRunning || c2.State() != events.WorkerPaused {
		t.Errorf("states after pausing %s: %s, %s", svc2.ID(), c1.State(), c2.State())
	}

	stats, err := client.Stats(ctx, []string{"convert"}, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(stats) != 2 || stats[0].Counts.Handled != 3 || stats[0].QueuePending != 4 || stats[0].QueueAckPending != 1 {
		t.Errorf("stats = %+v", stats)
	}

	if _, err := client.Status(ctx, []string{"convert"}, "no-such-instance"); err == nil {
		t.Error("a request for an unknown instance succeeded")
	}
	if _, err := client.Status(ctx, []string{"notify"}, ""); !errors.Is(err, control.ErrNoReplica) {
		t.Errorf("status of a function with no replica = %v, want ErrNoReplica", err)
	}
}

func TestReplicasShowAsMicroServicesWithTheirCounters(t *testing.T) {
	s := startNATS(t)
	svc := replica(t, s.url, "convert", &fakeWorker{state: events.WorkerRunning})

	msg, err := s.nc.Request("$SRV.INFO.imagepipe-convert", nil, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var info micro.Info
	if err := json.Unmarshal(msg.Data, &info); err != nil {
		t.Fatal(err)
	}
	if info.Name != "imagepipe-convert" || info.ID != svc.ID() || info.Version != "0.1.0-dev" || info.Metadata["function"] != "convert" {
		t.Errorf("info = %+v", info)
	}
	if len(info.Endpoints) != len(events.Verbs()) {
		t.Errorf("endpoints = %+v, want one per verb", info.Endpoints)
	}

	msg, err = s.nc.Request("$SRV.STATS.imagepipe-convert."+svc.ID(), nil, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var stats micro.Stats
	if err := json.Unmarshal(msg.Data, &stats); err != nil {
		t.Fatal(err)
	}
	var data events.ReplicaStats
	if len(stats.Endpoints) == 0 || json.Unmarshal(stats.Endpoints[0].Data, &data) != nil || data.Counts.Retried != 1 {
		t.Errorf("micro stats carry no replica counters: %+v", stats)
	}
}

func TestVersionsThatAreNotSemverStillRegister(t *testing.T) {
	s := startNATS(t)
	for _, v := range []string{"v1.2.3", "dev", "1.2"} {
		svc, err := control.Start(s.nc, control.Options{Function: "convert", Version: v, Worker: &fakeWorker{}})
		if err != nil {
			t.Fatalf("version %q: %v", v, err)
		}
		_ = svc.Stop()
	}
}

func getStatus(t *testing.T, kv jetstream.KeyValue, bucket, key string) events.Status {
	t.Helper()
	e, err := kv.Get(context.Background(), events.StatusKey(bucket, key))
	if err != nil {
		t.Fatal(err)
	}
	var st events.Status
	if err := json.Unmarshal(e.Value(), &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func TestCancelStopsARunningJobOnTheReplicaRunningIt(t *testing.T) {
	s := startNATS(t)
	kv := natstest.StatusBucket(t, s.js)
	idle := &fakeWorker{state: events.WorkerRunning}
	busy := &fakeWorker{state: events.WorkerRunning, jobs: []events.JobInfo{{JobRef: events.JobRef{ID: "j1", Bucket: "uploads", Key: "disks/a.vhdx"}}}}
	replica(t, s.url, "convert", idle)
	busySvc := replica(t, s.url, "convert", busy)
	natstest.PutStatus(t, kv, events.Status{Bucket: "uploads", Key: "disks/a.vhdx", JobID: "j1", State: events.StateConverting})

	res, err := control.NewClient(s.nc, 300*time.Millisecond).Cancel(context.Background(), kv, "uploads", "disks/a.vhdx")
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Running) != 1 || res.Running[0].Instance != busySvc.ID() || res.JobID != "j1" || res.Queued {
		t.Errorf("cancel = %+v, want the busy replica to have cancelled j1", res)
	}
	if st := getStatus(t, kv, "uploads", "disks/a.vhdx"); st.State != events.StateConverting {
		t.Errorf("status = %s; a running job's replica reports its own end", st.State)
	}
}

func TestCancelMarksAQueuedJobCancelledForConvertToSkip(t *testing.T) {
	s := startNATS(t)
	kv := natstest.StatusBucket(t, s.js)
	replica(t, s.url, "convert", &fakeWorker{state: events.WorkerRunning})
	client := control.NewClient(s.nc, 200*time.Millisecond)
	ctx := context.Background()
	natstest.PutStatus(t, kv, events.Status{Bucket: "uploads", Key: "q.vhdx", JobID: "j2", State: events.StateQueued, Attempt: 1})
	natstest.PutStatus(t, kv, events.Status{Bucket: "uploads", Key: "done.vhdx", JobID: "j3", State: events.StateReady})

	res, err := client.Cancel(ctx, kv, "uploads", "q.vhdx")
	if err != nil {
		t.Fatal(err)
	}
	if !res.Queued || res.JobID != "j2" || len(res.Running) != 0 {
		t.Errorf("cancel = %+v, want the queued job j2 cancelled", res)
	}
	if st := getStatus(t, kv, "uploads", "q.vhdx"); st.State != events.StateCancelled || st.JobID != "j2" || st.Message == "" {
		t.Errorf("status = %+v, want CANCELLED for job j2 with a message", st)
	}

	for _, key := range []string{"done.vhdx", "never-uploaded.vhdx"} {
		if _, err := client.Cancel(ctx, kv, "uploads", key); !errors.Is(err, control.ErrNothingToCancel) {
			t.Errorf("cancel %s = %v, want ErrNothingToCancel", key, err)
		}
	}
}
