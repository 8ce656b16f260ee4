package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/setup"
	"github.com/imagepipe/imagepipe/test/stack"
)

// A replica killed in the middle of a conversion leaves its job to the
// queue's redelivery; if the job's message is lost as well, nothing is left
// to redeliver, and only reconcile can see that the upload stands still.
func TestReplicaKilledMidConversionWhoseJobIsLostEndsReadyOnceAfterReconcile(t *testing.T) {
	stackEnv(t)
	res := subscribeResults(t)
	prefix := runPrefix("e2e/reconcile-heal/killed/")
	key := prefix + "killed.qcow2"
	// Data in every cluster: the conversion takes long enough to be caught
	// in the middle, and a run-unique write keeps de-duplication out.
	path := filepath.Join(t.TempDir(), "killed.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", path, "96M")
	runTool(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5d 0 96M",
		"-c", fmt.Sprintf("write -P 0x%02x 4M 64k", byte(runs.Add(1))), path)
	want, _ := localRaw(t, path, "qcow2")
	readies := countReady(t, key)

	// The stack's own convert waits; the job goes to a replica that runs
	// as a process of its own, so that it can die as a crash kills it.
	pauseStackConvert(t)
	replica, scratch := startKillableConvert(t)
	states := watchStatus(t, key)
	upload(t, key, path, false)

	// Held in the middle: qemu-img is stopped the moment it appears, so
	// that however loaded the machine, the kill finds the job converting.
	freezeConversionIn(t, scratch)
	converting := awaitStatus(t, states, func(st events.Status) bool { return st.State == events.StateConverting })
	replica.Kill()
	killQemuLeftIn(scratch)
	st := statusOf(t, "uploads", key)
	if st.State != events.StateConverting || st.JobID != converting.JobID {
		t.Fatalf("status after the kill is %s of job %s; want CONVERTING of job %s (the conversion ended before the kill)", st.State, st.JobID, converting.JobID)
	}
	// Lost, as an acknowledged write lost in a crash would be: the message
	// the dead replica held is gone with it.
	deleteJob(t, st.JobID)
	e2e.stack.workers["convert"].Resume()

	// No replica holds it and the queue does not: the status stands still.
	time.Sleep(2 * time.Second)
	if got := statusOf(t, "uploads", key); got.State != events.StateConverting || !got.UpdatedAt.Equal(st.UpdatedAt) {
		t.Fatalf("status moved to %s with no job anywhere, want CONVERTING as the dead replica left it", got.State)
	}

	c := reconcileHealsOnce(t, res, readies, prefix, key, st.JobID, want)
	if outputTag(t, c.OutputKey) != want {
		t.Errorf("output tag differs from the converted sha256 %s", want)
	}
}

// startKillableConvert runs `imagepipe convert` as an OS process against
// the e2e stack, and returns it with its scratch dir once it answers the
// control API, that is, once it is bound to the queue.
func startKillableConvert(t *testing.T) (*stack.Proc, string) {
	t.Helper()
	dir := t.TempDir()
	bin, err := stack.Build(context.Background(), dir)
	if err != nil {
		t.Fatal(err)
	}
	scratch := filepath.Join(dir, "scratch")
	if err := os.MkdirAll(scratch, 0o700); err != nil {
		t.Fatal(err)
	}
	// stackEnv has pointed this process's environment at the stack.
	env := append(os.Environ(), "IMAGEPIPE_SCRATCH_DIR="+scratch, "IMAGEPIPE_MAX_CONCURRENT_JOBS=1", "IMAGEPIPE_LOG_LEVEL=debug")
	before := convertInstances(t)
	p := stack.NewProc("convert-killable", bin, []string{"convert"}, env, filepath.Join(dir, "convert.log"))
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.Kill()
		killQemuLeftIn(scratch)
		if t.Failed() {
			if b, err := os.ReadFile(p.LogPath()); err == nil {
				t.Logf("killable convert's log:\n%s", b[max(0, len(b)-8000):])
			}
		}
	})
	awaitNewConvert(t, before, scaled(60*time.Second), func() bool { return p.Pid() == 0 }, func() string {
		b, _ := os.ReadFile(p.LogPath())
		return string(b)
	})
	return p, scratch
}

// awaitNewConvert waits until a convert replica that is not among before
// answers the control API, that is, once it is bound to the queue, and
// returns its instance id. exited tells that the replica is gone, and log
// is what it said, for the failure.
func awaitNewConvert(t *testing.T, before []string, within time.Duration, exited func() bool, log func() string) string {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		for _, id := range convertInstances(t) {
			if !slices.Contains(before, id) {
				return id
			}
		}
		if exited() || time.Now().After(deadline) {
			t.Fatalf("the new convert replica never answered the control API:\n%s", log())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// freezeConversionIn stops (SIGSTOP) the qemu-img convert that a replica
// runs on scratch as soon as it starts.
func freezeConversionIn(t *testing.T, scratch string) {
	t.Helper()
	deadline := time.Now().Add(stack.Scaled(90 * time.Second))
	for {
		for _, p := range stack.ProcessesUsing(scratch) {
			if strings.Contains(p.Cmdline, "qemu-img") && strings.Contains(p.Cmdline, " convert ") {
				if err := syscall.Kill(p.PID, syscall.SIGSTOP); err == nil {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the replica never started qemu-img convert")
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// killQemuLeftIn kills what a killed replica left running on its scratch,
// as an operator cleaning up a dead host would.
func killQemuLeftIn(scratch string) {
	for _, p := range stack.ProcessesUsing(scratch) {
		if proc, err := os.FindProcess(p.PID); err == nil {
			_ = proc.Kill()
		}
	}
}

// watchStatus delivers every record written for the input from now on.
func watchStatus(t *testing.T, key string) <-chan events.Status {
	t.Helper()
	ch := make(chan events.Status, 1024)
	onStatus(t, key, func(st events.Status) {
		select {
		case ch <- st:
		default:
		}
	})
	return ch
}

// onStatus calls each, from a goroutine of its own, with every record
// written for the input from now on, until the test ends.
func onStatus(t *testing.T, key string, each func(events.Status)) {
	t.Helper()
	kv, err := setup.StatusKV(context.Background(), e2e.js, 1)
	if err != nil {
		t.Fatal(err)
	}
	w, err := kv.Watch(context.Background(), events.StatusKey("uploads", key), jetstream.UpdatesOnly())
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for e := range w.Updates() {
			var st events.Status
			if e != nil && e.Operation() == jetstream.KeyValuePut && json.Unmarshal(e.Value(), &st) == nil {
				each(st)
			}
		}
	})
	t.Cleanup(func() { _ = w.Stop(); wg.Wait() })
}

// awaitStatus returns the first record that ok accepts.
func awaitStatus(t *testing.T, states <-chan events.Status, ok func(events.Status) bool) events.Status {
	t.Helper()
	deadline := time.After(stack.Scaled(90 * time.Second))
	for {
		select {
		case st := <-states:
			if ok(st) {
				return st
			}
		case <-deadline:
			t.Fatal("the status never reached the state awaited")
		}
	}
}
