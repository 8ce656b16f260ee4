//go:build linux

package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/test/stack"
)

// states follows every image's state in the status bucket, so that a fault
// can be aimed at a job in a given stage.
type states struct {
	mu   sync.Mutex
	now  map[string]events.Status // by input key
	subs map[chan events.Status]struct{}
}

// follow is what a test reads to judge a run of st: the results, collected
// by a consumer named durable (stop them before st closes), and every
// upload's state as it changes.
func follow(ctx context.Context, t *testing.T, st *stack.Stack, durable string) (*stack.Results, *states) {
	t.Helper()
	results, err := st.CollectResults(ctx, durable)
	if err != nil {
		t.Fatal(err)
	}
	sts, err := watchStates(ctx, st.JS)
	if err != nil {
		results.Stop()
		t.Fatal(err)
	}
	return results, sts
}

func watchStates(ctx context.Context, js jetstream.JetStream) (*states, error) {
	kv, err := js.KeyValue(ctx, events.StatusBucket)
	if err != nil {
		return nil, err
	}
	s := &states{now: map[string]events.Status{}, subs: map[chan events.Status]struct{}{}}
	go func() {
		// A watcher ends when NATS restarts under it; watch again.
		for ctx.Err() == nil {
			w, err := kv.WatchAll(ctx, jetstream.UpdatesOnly())
			if err != nil {
				time.Sleep(200 * time.Millisecond)
				continue
			}
			for e := range w.Updates() {
				if e == nil || e.Operation() != jetstream.KeyValuePut {
					continue
				}
				var st events.Status
				if json.Unmarshal(e.Value(), &st) == nil {
					s.update(st)
				}
			}
			_ = w.Stop()
		}
	}()
	return s, nil
}

func (s *states) update(st events.Status) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.now[st.Key] = st
	for ch := range s.subs {
		select {
		case ch <- st:
		default:
		}
	}
}

// inFlight lists the images a convert replica started at since is working
// on now. Older records in a working state belong to a replica that was
// killed: their jobs wait for redelivery.
func (s *states) inFlight(since time.Time) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var keys []string
	for k, st := range s.now {
		if st.UpdatedAt.Before(since) {
			continue
		}
		switch st.State {
		case events.StateDownloading, events.StateInspecting, events.StateConverting, events.StateUploading:
			keys = append(keys, k)
		}
	}
	return keys
}

// await returns the first image seen entering state (or in it already,
// by a record no older than since) for which ok holds, or "" when none
// does within limit.
func (s *states) await(ctx context.Context, state events.State, since time.Time, ok func(key string) bool, limit time.Duration) string {
	ch := make(chan events.Status, 64)
	s.mu.Lock()
	s.subs[ch] = struct{}{}
	var already []string
	for k, st := range s.now {
		if st.State == state && !st.UpdatedAt.Before(since) {
			already = append(already, k)
		}
	}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.subs, ch)
		s.mu.Unlock()
	}()
	for _, k := range already {
		if ok(k) {
			return k
		}
	}
	timer := time.NewTimer(limit)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return ""
		case <-timer.C:
			return ""
		case st := <-ch:
			if st.State == state && ok(st.Key) {
				return st.Key
			}
		}
	}
}

// injector applies faults to a stack and keeps the books on them.
type injector struct {
	st     *stack.Stack
	states *states
	rng    *rand.Rand
	logf   func(format string, args ...any)

	mu       sync.Mutex
	injected []fault
	hits     map[string]int // kills suffered by each image's job
}

// fault is one line of the report.
type fault struct {
	Name     string
	Targeted bool   // hit the stage it aimed at
	Detail   string // which image, how long
}

// maxKillsPerJob keeps each job well inside IMAGEPIPE_MAX_ATTEMPTS: a job
// killed on its last delivery is dropped by JetStream with no failure
// event, because the replica that would publish it is dead, and that is a
// limit of max-deliveries, not the faults under test here. A kill aims at
// a job below the limit; the jobs it takes down with it may go one over.
const maxKillsPerJob = 2

func (in *injector) faults() []fault {
	in.mu.Lock()
	defer in.mu.Unlock()
	return slices.Clone(in.injected)
}

func (in *injector) record(f fault) {
	in.mu.Lock()
	in.injected = append(in.injected, f)
	in.mu.Unlock()
	in.logf("fault at %s: %s targeted=%v %s", time.Now().Format("15:04:05.000"), f.Name, f.Targeted, f.Detail)
}

// killConvert waits for a job to reach stage (one that prefer accepts, if
// any does within the wait, else any job), kills the convert replica with
// SIGKILL, and starts it again.
func (in *injector) killConvert(ctx context.Context, stage events.State, prefer func(string) bool, delay time.Duration) error {
	conv := in.st.Procs["convert"]
	spare := func(key string) bool {
		flying := in.states.inFlight(conv.StartedAt())
		in.mu.Lock()
		defer in.mu.Unlock()
		if in.hits[key] >= maxKillsPerJob {
			return false
		}
		for _, k := range flying {
			if in.hits[k] > maxKillsPerJob {
				return false
			}
		}
		return true
	}
	key := ""
	if prefer != nil {
		key = in.states.await(ctx, stage, conv.StartedAt(), func(k string) bool { return prefer(k) && spare(k) }, 30*time.Second)
	}
	if key == "" {
		key = in.states.await(ctx, stage, conv.StartedAt(), spare, 10*time.Second)
	}
	// Somewhere inside the stage, not always at its first instant.
	time.Sleep(delay + time.Duration(in.rng.IntN(150))*time.Millisecond)
	victims := in.states.inFlight(conv.StartedAt())
	conv.Kill()
	in.mu.Lock()
	for _, k := range victims {
		in.hits[k]++
	}
	if key != "" && stage == events.StateReady {
		in.hits[key]++
	}
	in.mu.Unlock()
	down := time.Duration(200+in.rng.IntN(800)) * time.Millisecond
	detail := fmt.Sprintf("at %s of %q, %d job(s) in flight, down %s", stage, key, len(victims), down.Round(time.Millisecond))
	if key == "" {
		detail = fmt.Sprintf("no job reached %s in time; killed with %d job(s) in flight", stage, len(victims))
	}
	in.record(fault{Name: "kill -9 convert (" + string(stage) + ")", Targeted: key != "", Detail: detail})
	time.Sleep(down)
	return conv.Start()
}

func (in *injector) restartNATS(down time.Duration, whileDown func()) error {
	done := make(chan struct{})
	go func() {
		defer close(done)
		if whileDown != nil {
			time.Sleep(down / 4)
			whileDown()
		}
	}()
	err := in.st.RestartNATS(down)
	<-done
	in.record(fault{Name: "restart NATS (store kept)", Targeted: true, Detail: fmt.Sprintf("down %s", down)})
	return err
}

func (in *injector) restartMinIO(ctx context.Context, down time.Duration) error {
	err := in.st.RestartMinIO(ctx, true, down)
	in.record(fault{Name: "kill -9 and restart MinIO", Targeted: true, Detail: fmt.Sprintf("down %s", down)})
	return err
}

// fillScratch fills the scratch filesystem to the last block for hold,
// then frees it: jobs that meet the full disk must retry, not fail.
func (in *injector) fillScratch(ctx context.Context, fsRoot string, hold time.Duration) error {
	in.states.await(ctx, events.StateDownloading, time.Now(), func(string) bool { return true }, 10*time.Second)
	path := filepath.Join(fsRoot, "ballast")
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	// In steps, so that whatever jobs write meanwhile, the last step is
	// the one that finds the filesystem full.
	var size int64
	const step = 1 << 20
	for {
		err = syscall.Fallocate(int(f.Fd()), 0, size, step)
		if err != nil {
			break
		}
		size += step
	}
	if cerr := f.Close(); !errors.Is(err, syscall.ENOSPC) || cerr != nil {
		_ = os.Remove(path)
		return fmt.Errorf("fill scratch: %w", errors.Join(err, cerr))
	}
	flying := len(in.states.inFlight(in.st.Procs["convert"].StartedAt()))
	time.Sleep(hold)
	in.record(fault{Name: "scratch filesystem full", Targeted: true,
		Detail: fmt.Sprintf("%d MiB ballast held %s, %d job(s) in flight", size>>20, hold, flying)})
	return os.Remove(path)
}

// slackOutage takes the webhook down for d from the first result on, so
// that the outage meets notifications.
func (in *injector) slackOutage(ctx context.Context, s *flakySlack, d time.Duration) {
	go func() {
		in.states.await(ctx, events.StateReady, time.Time{}, func(string) bool { return true }, time.Minute)
		s.down.Store(true)
		time.Sleep(d)
		s.down.Store(false)
		in.record(fault{Name: "Slack webhook answering 500", Targeted: s.refused.Load() > 0,
			Detail: fmt.Sprintf("for %s from the first result, %d post(s) refused", d, s.refused.Load())})
	}()
}
