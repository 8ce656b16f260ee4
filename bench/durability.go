package bench

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/infra"
	"github.com/imagepipe/imagepipe/internal/natsserver"
	"github.com/imagepipe/imagepipe/internal/setup"
	"github.com/imagepipe/imagepipe/test/stack"
)

// Sync is what `sync_interval: always` costs: JetStream writing every
// message to disk before acknowledging it, against the server's default
// of acknowledging first and flushing every two minutes.
type Sync struct {
	Rounds    int // interleaved rounds per target and setting
	SeqJobs   int // jobs one at a time per round
	Workers   int // jobs at a time in the throughput part
	BurstJobs int // jobs per round in the throughput part
	JobWrites int // acknowledged writes one job makes
	Targets   []SyncTarget
}

// SyncTarget is one server set-up measured with both settings.
type SyncTarget struct {
	Name            string
	Default, Always SyncFigures
}

// SyncFigures are one setting's measurements on one target.
type SyncFigures struct {
	PerJob []time.Duration // one job's writes, one job at a time
	Burst  []time.Duration // BurstJobs jobs, Workers at a time
}

// JobsPerSecond is the median throughput of the burst.
func (f SyncFigures) JobsPerSecond(jobs int) float64 {
	d := stack.Median(f.Burst)
	if d == 0 {
		return 0
	}
	return float64(jobs) / d.Seconds()
}

// jobStates are the status records convert writes for a job that
// succeeds, after ingest's QUEUED.
var jobStates = []events.State{events.StateDownloading, events.StateInspecting, events.StateConverting, events.StateUploading, events.StateReady}

// syncJobWrites is how many acknowledged writes writeJob makes.
var syncJobWrites = 4 + len(jobStates)

// defaultSyncInterval is the server's flush period when sync_interval is
// not set.
const defaultSyncInterval = 2 * time.Minute

// RunSync measures the acknowledged JetStream writes of a job with both
// settings, on the embedded server `imagepipe dev` runs and on a
// three-node cluster made from the cluster configs in confDir
// (infra/nats), with streams and buckets as `imagepipe setup` makes them
// (three replicas on the cluster). The two settings run side by side,
// round by round, so that the ratio between them is not skewed by
// whatever else the machine does.
func RunSync(ctx context.Context, dir, confDir string, logf func(string, ...any)) (*Sync, error) {
	res := &Sync{Rounds: 3, SeqJobs: 20, Workers: 8, BurstJobs: 80, JobWrites: syncJobWrites}
	targets := []struct {
		name     string
		replicas int
		start    func(dir string, always bool) (*syncTarget, error)
	}{
		{"embedded server (`imagepipe dev`, tests)", 1, startEmbedded},
		{"three-node cluster (infra/nats/cluster-*.conf, 3 replicas)", 3, func(dir string, always bool) (*syncTarget, error) {
			return startSyncCluster(dir, confDir, always)
		}},
	}
	for ti, tg := range targets {
		logf("sync: %s", tg.name)
		var pair [2]*syncTarget
		for i, always := range []bool{false, true} {
			t, err := tg.start(filepath.Join(dir, fmt.Sprintf("t%d-%v", ti, always)), always)
			if err != nil {
				closeTargets(pair[:])
				return nil, err
			}
			pair[i] = t
			if err := t.prepare(ctx, tg.replicas); err != nil {
				closeTargets(pair[:])
				return nil, err
			}
			if !t.settingHolds() {
				closeTargets(pair[:])
				return nil, fmt.Errorf("sync: the %s did not run with sync always %v (do the cluster configs still set sync_interval: always?)", tg.name, always)
			}
		}
		row, err := res.measure(ctx, pair)
		closeTargets(pair[:])
		if err != nil {
			return nil, fmt.Errorf("sync on the %s: %w", tg.name, err)
		}
		row.Name = tg.name
		res.Targets = append(res.Targets, row)
	}
	return res, nil
}

// measure runs the rounds on both settings, interleaved.
func (res *Sync) measure(ctx context.Context, pair [2]*syncTarget) (SyncTarget, error) {
	var row SyncTarget
	figs := [2]*SyncFigures{&row.Default, &row.Always}
	for r := range res.Rounds + 1 { // round 0 warms up and is not counted
		for i, t := range pair {
			seq, err := t.sequential(ctx, res.SeqJobs)
			if err != nil {
				return row, err
			}
			burst, err := t.burst(ctx, res.BurstJobs, res.Workers)
			if err != nil {
				return row, err
			}
			if r > 0 {
				figs[i].PerJob = append(figs[i].PerJob, seq...)
				figs[i].Burst = append(figs[i].Burst, burst)
			}
		}
	}
	return row, nil
}

// syncTarget is one running server set-up and a client of it.
type syncTarget struct {
	servers []*server.Server
	embed   *natsserver.Server
	url     string
	nc      *nats.Conn
	js      jetstream.JetStream
	status  jetstream.KeyValue
	next    int
	always  bool
}

func startEmbedded(dir string, always bool) (*syncTarget, error) {
	s, err := natsserver.Start(natsserver.Options{Port: -1, StoreDir: dir, SyncAlways: always})
	if err != nil {
		return nil, err
	}
	return &syncTarget{embed: s, url: s.URL(), always: always}, nil
}

// startSyncCluster runs the three shipped cluster configs on loopback.
// They set sync_interval: always; the default setting is theirs with it
// taken out.
func startSyncCluster(dir, confDir string, always bool) (*syncTarget, error) {
	ports, cports, routes, err := infra.ClusterPorts(3)
	if err != nil {
		return nil, err
	}
	t := &syncTarget{always: always}
	var opts *server.Options
	for i := range 3 {
		o, err := infra.LoadNATS(infra.NATSNode{
			Config:   filepath.Join(confDir, fmt.Sprintf("cluster-%d.conf", i+1)),
			StoreDir: filepath.Join(dir, fmt.Sprintf("nats-%d", i+1)),
			Port:     ports[i], ClusterPort: cports[i], Routes: routes,
		})
		if err != nil {
			t.close()
			return nil, err
		}
		if !always {
			o.SyncAlways, o.SyncInterval = false, defaultSyncInterval
		}
		s, err := infra.StartNATS(o, nil)
		if err != nil {
			t.close()
			return nil, err
		}
		t.servers, opts = append(t.servers, s), o
	}
	url, err := infra.ClientURL(opts, "admin", ports...)
	if err != nil {
		t.close()
		return nil, err
	}
	t.url = url
	return t, nil
}

// settingHolds says whether every server runs with the setting asked
// for; the embedded server takes it as given.
func (t *syncTarget) settingHolds() bool {
	for _, s := range t.servers {
		if c := s.JetStreamConfig(); c == nil || c.SyncAlways != t.always {
			return false
		}
	}
	return true
}

// prepare connects and makes the streams and the status bucket.
func (t *syncTarget) prepare(ctx context.Context, replicas int) error {
	nc, err := nats.Connect(t.url, nats.MaxReconnects(-1))
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	t.nc = nc
	if t.js, err = jetstream.New(nc); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if _, err := setup.JetStream(ctx, t.js, setup.StreamConfig{Replicas: replicas}); err != nil {
		return fmt.Errorf("setup: %w", err)
	}
	if t.status, err = t.js.KeyValue(ctx, events.StatusBucket); err != nil {
		return fmt.Errorf("status bucket: %w", err)
	}
	return nil
}

// writeJob makes the acknowledged writes of one job that succeeds, in
// the pipeline's order, each waiting for its acknowledgement as the
// functions do: MinIO's notification, ingest's QUEUED record and job,
// convert's status records and its result.
func (t *syncTarget) writeJob(ctx context.Context, n int) error {
	id := fmt.Sprintf("bench-%d", n)
	key := "bench." + id
	body := make([]byte, 512) // about the size of a notification, a job or a result
	if _, err := t.js.Publish(ctx, events.SubjectS3Events, body); err != nil {
		return fmt.Errorf("publish notification: %w", err)
	}
	if _, err := t.status.Put(ctx, key, []byte(events.StateQueued)); err != nil {
		return fmt.Errorf("status %s: %w", events.StateQueued, err)
	}
	if _, err := t.js.Publish(ctx, events.SubjectConvertJob, body, jetstream.WithMsgID(id)); err != nil {
		return fmt.Errorf("publish job: %w", err)
	}
	for _, s := range jobStates {
		if _, err := t.status.Put(ctx, key, []byte(s)); err != nil {
			return fmt.Errorf("status %s: %w", s, err)
		}
	}
	if _, err := t.js.Publish(ctx, events.SubjectConverted, body, jetstream.WithMsgID("converted/"+id)); err != nil {
		return fmt.Errorf("publish result: %w", err)
	}
	return nil
}

// sequential times jobs one after the other.
func (t *syncTarget) sequential(ctx context.Context, jobs int) ([]time.Duration, error) {
	out := make([]time.Duration, 0, jobs)
	for range jobs {
		t.next++
		start := time.Now()
		if err := t.writeJob(ctx, t.next); err != nil {
			return nil, err
		}
		out = append(out, time.Since(start))
	}
	return out, nil
}

// burst times jobs made by workers at a time.
func (t *syncTarget) burst(ctx context.Context, jobs, workers int) (time.Duration, error) {
	first := t.next
	t.next += jobs
	work := make(chan int)
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	start := time.Now()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := range work {
				if err := t.writeJob(ctx, n); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	var err error
feed:
	for n := first + 1; n <= first+jobs; n++ {
		select {
		case work <- n:
		case err = <-errs:
			break feed
		}
	}
	close(work)
	wg.Wait()
	took := time.Since(start)
	if err == nil {
		select {
		case err = <-errs:
		default:
		}
	}
	return took, err
}

func (t *syncTarget) close() {
	if t == nil {
		return
	}
	if t.nc != nil {
		t.nc.Close()
	}
	if t.embed != nil {
		t.embed.Shutdown()
	}
	for _, s := range t.servers {
		s.Shutdown()
		s.WaitForShutdown()
	}
}

func closeTargets(ts []*syncTarget) {
	for _, t := range ts {
		t.close()
	}
}
