//go:build linux

package chaos

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/test/stack"
)

// drainGrace is the grace period the test gives a SIGTERMed replica, as
// terminationGracePeriodSeconds does on Kubernetes: generous, because a
// loaded machine may take a while over a 1 GiB conversion.
const drainGrace = 3 * time.Minute

// A scale-in, as KEDA and Kubernetes do it: a real `imagepipe convert`
// process gets SIGTERM while it converts. It takes no new job, finishes or
// hands back the one it runs within the grace period, and exits 0; the
// image is READY exactly once with the bytes a local qemu-img makes, and
// a job queued after the signal goes to the replica that stays.
func TestScaleInSIGTERMFinishesOrHandsBackTheRunningJobAndExitsZero(t *testing.T) {
	if err := stack.CheckTools(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(10*time.Minute))
	defer cancel()
	dir := t.TempDir()
	bin, err := stack.Build(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	// Large enough to be mid-conversion when the signal lands: 1 GiB of
	// disk with 160 MiB of data to download, convert and upload.
	run := fmt.Sprintf("drain-%d", time.Now().UnixNano())
	imgs, err := stack.MakeAll(ctx, filepath.Join(dir, "images"),
		[]string{run + "/running", run + "/after"},
		[]stack.Spec{
			{Kind: stack.KindQcow2, Virtual: 1 << 30, Data: 160 << 20, Seed: uint64(time.Now().UnixNano())},
			{Kind: stack.KindVMDK, Virtual: 16 << 20, Data: 2 << 20, Seed: uint64(time.Now().UnixNano()) + 1},
		}, true)
	if err != nil {
		t.Fatal(err)
	}
	running, after := imgs[0], imgs[1]

	st, err := stack.Start(ctx, stack.Config{
		Dir: filepath.Join(dir, "stack"), Binary: bin,
		// convert replicas are this test's own processes.
		Functions: []string{"ingest", "notify"},
		Env:       map[string]string{"IMAGEPIPE_ACK_WAIT": "10s", "IMAGEPIPE_RETRY_BACKOFF": "1s"},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	results, sts := follow(ctx, t, st, "drain-audit")
	defer results.Stop()
	readies := countReadies(ctx, t, st)

	leaving := startConvert(t, st, bin, dir, "leaving")
	if _, err := st.Upload(ctx, running); err != nil {
		t.Fatal(err)
	}
	waitWorking(ctx, t, sts, running.Key)

	signalled := time.Now()
	if err := leaving.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// The replica that stays, and a job for it: the leaving one must not
	// take it.
	staying := startConvert(t, st, bin, dir, "staying")
	if _, err := st.Upload(ctx, after); err != nil {
		t.Fatal(err)
	}

	code, took := leaving.wait(t, drainGrace)
	if code != 0 {
		t.Fatalf("the SIGTERMed replica exited %d after %s, want 0:\n%s", code, took, leaving.log(t))
	}
	t.Logf("the SIGTERMed replica exited 0 %s after the signal", took.Round(time.Millisecond))

	if err := results.Wait(ctx, func(rs []stack.Result) bool {
		final := map[string]bool{}
		for _, r := range rs {
			if r.Final() {
				final[r.Key] = true
			}
		}
		return final[running.Key] && final[after.Key]
	}); err != nil {
		t.Fatalf("results never came: %v\n%s%s", err, leaving.log(t), staying.log(t))
	}
	for _, img := range []stack.Image{running, after} {
		var converted []*events.Converted
		for _, r := range results.All() {
			if r.Key != img.Key {
				continue
			}
			if r.Failed != nil && !r.Failed.WillRetry {
				t.Errorf("%s failed for good: %s: %s", img.Key, r.Failed.Phase, r.Failed.Message)
			}
			if r.Converted != nil {
				converted = append(converted, r.Converted)
			}
		}
		if len(converted) != 1 {
			t.Fatalf("%s: %d converted events, want exactly 1", img.Key, len(converted))
		}
		want := img.Outputs[img.Key+".raw"]
		sum, n, err := st.ObjectSHA256(ctx, stack.OutputBucket, img.Key+".raw")
		if err != nil {
			t.Fatal(err)
		}
		if converted[0].SHA256 != want || sum != want || n != img.VirtualSize {
			t.Errorf("%s: event sha256 %s, output %d bytes sha256 %s; qemu-img here makes %d bytes sha256 %s",
				img.Key, converted[0].SHA256, n, sum, img.VirtualSize, want)
		}
	}
	readyAt := sts.get(running.Key).UpdatedAt
	if !readyAt.After(signalled) {
		t.Fatalf("the job was READY at %s, before the signal at %s: nothing was drained", readyAt, signalled)
	}
	if n := readies.count(running.Key); n != 1 {
		t.Errorf("%s became READY %d times, want exactly once", running.Key, n)
	}
	if n := readies.count(after.Key); n != 1 {
		t.Errorf("%s became READY %d times, want exactly once", after.Key, n)
	}

	// Finished by the leaving replica, or handed back and finished by the
	// staying one; never by both, and the job queued after the signal only
	// by the one that stays.
	byLeaving, byStaying := leaving.converted(t, running.Key), staying.converted(t, running.Key)
	switch {
	case byLeaving && !byStaying:
		t.Logf("the SIGTERMed replica finished its job in the grace period")
	case byStaying && !byLeaving:
		t.Logf("the SIGTERMed replica handed its job back; the staying replica finished it")
	default:
		t.Errorf("the running job was converted by the leaving replica: %t, by the staying one: %t; want exactly one", byLeaving, byStaying)
	}
	if leaving.converted(t, after.Key) {
		t.Errorf("the SIGTERMed replica took %s, queued after the signal", after.Key)
	}
}

// waitWorking waits until a replica works on key's job.
func waitWorking(ctx context.Context, t *testing.T, s *states, key string) {
	t.Helper()
	deadline := time.Now().Add(stack.Scaled(3 * time.Minute))
	for {
		switch st := s.get(key); st.State {
		case events.StateDownloading, events.StateInspecting, events.StateConverting, events.StateUploading:
			return
		case events.StateReady, events.StateFailed, events.StateDuplicate, events.StateCancelled:
			t.Fatalf("%s ended %s before the signal could land: %+v", key, st.State, st)
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Fatalf("no replica took %s: %+v", key, s.get(key))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (s *states) get(key string) events.Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.now[key]
}

// readyCounts counts READY writes per input key: a watcher sees each of
// them as the image finishing.
type readyCounts struct {
	mu sync.Mutex
	n  map[string]int
}

func (r *readyCounts) count(key string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n[key]
}

func countReadies(ctx context.Context, t *testing.T, st *stack.Stack) *readyCounts {
	t.Helper()
	kv, err := st.JS.KeyValue(ctx, events.StatusBucket)
	if err != nil {
		t.Fatal(err)
	}
	w, err := kv.WatchAll(ctx, jetstream.UpdatesOnly())
	if err != nil {
		t.Fatal(err)
	}
	r := &readyCounts{n: map[string]int{}}
	var wg sync.WaitGroup
	wg.Go(func() {
		for e := range w.Updates() {
			var s events.Status
			if e == nil || e.Operation() != jetstream.KeyValuePut || json.Unmarshal(e.Value(), &s) != nil {
				continue
			}
			if s.State == events.StateReady {
				r.mu.Lock()
				r.n[s.Key]++
				r.mu.Unlock()
			}
		}
	})
	t.Cleanup(func() { _ = w.Stop(); wg.Wait() })
	return r
}

// convertProc is `imagepipe convert` run by the test itself, to see its
// exit code.
type convertProc struct {
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	code    int
	exited  time.Time
}

func startConvert(t *testing.T, st *stack.Stack, bin, dir, name string) *convertProc {
	t.Helper()
	// A short path: a raw output streams to S3 while qemu-img writes it
	// only where the job's socket path fits a socket address, and the
	// test's name alone makes t.TempDir too long for that.
	scratch, err := os.MkdirTemp("", "drain-"+name+"-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(scratch) })
	access, secret := st.Credentials()
	p := &convertProc{logPath: filepath.Join(dir, "convert-"+name+".log"), done: make(chan struct{})}
	f, err := os.Create(p.logPath)
	if err != nil {
		t.Fatal(err)
	}
	p.cmd = exec.Command(bin, "convert")
	p.cmd.Env = []string{
		"PATH=" + os.Getenv("PATH"),
		"HOME=" + os.Getenv("HOME"),
		"TMPDIR=" + scratch,
		"IMAGEPIPE_NATS_URL=" + st.NATSURL(),
		"IMAGEPIPE_S3_ENDPOINT=" + st.S3Endpoint(),
		"IMAGEPIPE_S3_ACCESS_KEY=" + access,
		"IMAGEPIPE_S3_SECRET_KEY=" + secret,
		"IMAGEPIPE_INPUT_BUCKET=" + stack.InputBucket,
		"IMAGEPIPE_OUTPUT_BUCKET=" + stack.OutputBucket,
		"IMAGEPIPE_SCRATCH_DIR=" + scratch,
		"IMAGEPIPE_MAX_CONCURRENT_JOBS=1",
		"IMAGEPIPE_ACK_WAIT=10s",
		"IMAGEPIPE_RETRY_BACKOFF=1s",
		"IMAGEPIPE_LOG_LEVEL=info",
	}
	p.cmd.Stdout, p.cmd.Stderr = f, f
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		err := p.cmd.Wait()
		f.Close()
		p.code, p.exited = 0, time.Now()
		var exit *exec.ExitError
		if errors.As(err, &exit) {
			p.code = exit.ExitCode()
		} else if err != nil {
			p.code = -1
		}
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Signal(syscall.SIGKILL)
			<-p.done
		}
	})
	return p
}

// wait returns the exit code, failing the test if the process outlives
// grace, as Kubernetes would kill it then.
func (p *convertProc) wait(t *testing.T, grace time.Duration) (int, time.Duration) {
	t.Helper()
	start := time.Now()
	select {
	case <-p.done:
		return p.code, p.exited.Sub(start)
	case <-time.After(grace):
		t.Fatalf("still running %s after SIGTERM, past the grace period:\n%s", grace, p.log(t))
	}
	return -1, 0
}

func (p *convertProc) log(t *testing.T) string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return err.Error()
	}
	return fmt.Sprintf("--- %s ---\n%s\n", filepath.Base(p.logPath), b[max(0, len(b)-6000):])
}

// converted reports whether the replica logged a conversion of key.
func (p *convertProc) converted(t *testing.T, key string) bool {
	t.Helper()
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		if !strings.Contains(line, " msg=converted ") {
			continue
		}
		for field := range strings.FieldsSeq(line) {
			if field == "key="+key {
				return true
			}
		}
	}
	return false
}
