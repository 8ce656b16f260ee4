package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/control"
	"github.com/imagepipe/imagepipe/internal/fleet"
	"github.com/imagepipe/imagepipe/internal/natstest"
	"github.com/imagepipe/imagepipe/internal/setup"
)

// lockedBuffer collects what a command writes from several goroutines.
type lockedBuffer = natstest.LogBuffer

// stackEnv points commands run in the test at the e2e stack, the way an
// operator's environment points them at a deployment. t.Setenv rules out
// t.Parallel, which these tests could not use anyway: they steer the
// stack's shared convert replica.
func stackEnv(t *testing.T) {
	t.Helper()
	s := e2e.stack.s
	for k, v := range map[string]string{
		"IMAGEPIPE_NATS_URL":      s.NATS.URL,
		"IMAGEPIPE_S3_ENDPOINT":   s.S3.Endpoint,
		"IMAGEPIPE_S3_ACCESS_KEY": s.S3.AccessKey,
		"IMAGEPIPE_S3_SECRET_KEY": s.S3.SecretKey,
		// A replica started here must not change the shared consumer.
		"IMAGEPIPE_ACK_WAIT":      s.Convert.AckWait.String(),
		"IMAGEPIPE_RETRY_BACKOFF": s.Convert.RetryBackoff.String(),
		"IMAGEPIPE_SCRATCH_DIR":   t.TempDir(),
		"IMAGEPIPE_LOG_LEVEL":     "warn",
	} {
		t.Setenv(k, v)
	}
}

type cmdResult struct {
	code           int
	stdout, stderr string
}

// imagepipe runs the command in-process, as main would.
func imagepipe(t *testing.T, args ...string) cmdResult {
	t.Helper()
	var out, errb lockedBuffer
	code := run(args, &out, &errb)
	return cmdResult{code: code, stdout: out.String(), stderr: errb.String()}
}

func ctlJSON[T any](t *testing.T, args ...string) T {
	t.Helper()
	r := imagepipe(t, append([]string{"ctl"}, append(args, "--json", "--timeout", "500ms")...)...)
	if r.code != 0 {
		t.Fatalf("ctl %v exited %d: %s", args, r.code, r.stderr)
	}
	var v T
	if err := json.Unmarshal([]byte(r.stdout), &v); err != nil {
		t.Fatalf("ctl %v printed no JSON: %v\n%s", args, err, r.stdout)
	}
	return v
}

// replicaRun is `imagepipe convert` running in this process beside the
// stack's own convert function, with its own connection and control
// service, as a second machine's replica would.
type replicaRun struct {
	id   string
	done chan int
	logs *lockedBuffer
}

func convertInstances(t *testing.T) []string {
	t.Helper()
	sts, err := control.NewClient(e2e.nc, 300*time.Millisecond).Status(context.Background(), []string{"convert"}, "")
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, s := range sts {
		ids = append(ids, s.Instance)
	}
	return ids
}

func startConvertReplica(t *testing.T, env map[string]string) *replicaRun {
	t.Helper()
	for k, v := range env {
		t.Setenv(k, v)
	}
	before := convertInstances(t)
	r := &replicaRun{done: make(chan int, 1), logs: &lockedBuffer{}}
	go func() { r.done <- run([]string{"convert"}, io.Discard, r.logs) }()
	r.id = awaitNewConvert(t, before, scaled(30*time.Second), func() bool { return len(r.done) > 0 }, r.logs.String)
	t.Cleanup(func() {
		select {
		case <-r.done:
			return
		default:
		}
		_, _ = control.NewClient(e2e.nc, time.Second).Steer(context.Background(), []string{"convert"}, events.VerbStop, r.id)
		select {
		case <-r.done:
		case <-time.After(scaled(30 * time.Second)):
			t.Errorf("replica %s did not stop", r.id)
		}
	})
	return r
}

// exit waits for the replica's process exit code.
func (r *replicaRun) exit(t *testing.T) int {
	t.Helper()
	select {
	case code := <-r.done:
		r.done <- code
		return code
	case <-time.After(scaled(60 * time.Second)):
		t.Fatalf("replica %s did not exit:\n%s", r.id, r.logs.String())
	}
	return -1
}

// pauseStackConvert leaves the jobs of the test to the replicas it
// starts, until the test ends.
func pauseStackConvert(t *testing.T) {
	t.Helper()
	id := e2e.stack.controls["convert"].ID()
	sts := ctlJSON[[]events.ReplicaStatus](t, "pause", "--instance", id)
	if len(sts) != 1 || sts[0].Instance != id || sts[0].State != events.WorkerPaused {
		t.Fatalf("pause of the stack's convert answered %+v", sts)
	}
	t.Cleanup(e2e.stack.workers["convert"].Resume)
}

// watchState reports the states of one input's status record.
func watchState(t *testing.T, key string) <-chan events.State {
	t.Helper()
	ch := make(chan events.State, 64)
	onStatus(t, key, func(st events.Status) {
		select {
		case ch <- st.State:
		default:
		}
	})
	return ch
}

// awaitStarted waits until a replica has taken the input's job.
func awaitStarted(t *testing.T, states <-chan events.State) {
	t.Helper()
	for {
		select {
		case s := <-states:
			if s != events.StateQueued && s != events.StateUploaded {
				return
			}
		case <-time.After(scaled(30 * time.Second)):
			t.Fatal("no replica took the job")
		}
	}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func scrapeMetrics(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("/metrics does not parse as Prometheus text: %v", err)
	}
	return fams
}

// counter is the value of the counter name whose labels include want.
func counter(fams map[string]*dto.MetricFamily, name string, want map[string]string) float64 {
	f := fams[name]
	if f == nil {
		return 0
	}
	var sum float64
next:
	for _, m := range f.GetMetric() {
		for _, l := range m.GetLabel() {
			if v, ok := want[l.GetName()]; ok && v != l.GetValue() {
				continue next
			}
		}
		sum += m.GetCounter().GetValue()
	}
	return sum
}

func TestCtlSeesEveryConvertReplicaAndMetricsMoveWhenAJobRuns(t *testing.T) {
	stackEnv(t)
	addr := freeAddr(t)
	r := startConvertReplica(t, map[string]string{"IMAGEPIPE_METRICS_ADDR": addr})
	stackID := e2e.stack.controls["convert"].ID()

	sts := ctlJSON[[]events.ReplicaStatus](t, "status", "--function", "convert")
	var ids []string
	for _, s := range sts {
		ids = append(ids, s.Instance)
		if s.Function != "convert" || s.State != events.WorkerRunning || s.Config["output_bucket"] != "images" {
			t.Errorf("replica status = %+v", s)
		}
		for k, v := range s.Config {
			if strings.Contains(v, e2e.stack.s.S3.SecretKey) {
				t.Errorf("status shows the S3 secret in %s", k)
			}
		}
	}
	if len(sts) != 2 || !slices.Contains(ids, stackID) || !slices.Contains(ids, r.id) {
		t.Fatalf("ctl status sees %v, want the stack's %s and the second replica %s", ids, stackID, r.id)
	}
	if table := imagepipe(t, "ctl", "status", "--timeout", "500ms"); table.code != 0 || !strings.Contains(table.stdout, r.id) || !strings.Contains(table.stdout, "notify") {
		t.Errorf("ctl status table (exit %d):\n%s%s", table.code, table.stdout, table.stderr)
	}

	resp, err := http.Get("http://" + addr + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("/readyz of a running replica = %s", resp.Status)
	}
	converted := map[string]string{"outcome": "converted", "format": "qcow2"}
	before := counter(scrapeMetrics(t, addr), "imagepipe_jobs_total", converted)

	pauseStackConvert(t)
	res := subscribeResults(t)
	// A key and content of this run's own, as in the fleet stats test.
	key := runPrefix("e2e/ops/metrics/") + "disk.qcow2"
	upload(t, key, makeImage(t, t.TempDir(), "disk.qcow2", "qcow2", "write -P 0xb1 5M 1M", fmt.Sprintf("write -P 0x%02x 1M 64k", byte(runs.Add(1)))), false)
	if ev := res.await(t, key, 90*time.Second); ev.Type != events.TypeConverted {
		t.Fatalf("result %s: %s", ev.Type, ev.Data)
	}
	// The result is out a moment before the runtime has settled the
	// message and counted it.
	var fams map[string]*dto.MetricFamily
	deadline := time.Now().Add(scaled(10 * time.Second))
	for {
		fams = scrapeMetrics(t, addr)
		if got := counter(fams, "imagepipe_jobs_total", converted); got == before+1 {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("imagepipe_jobs_total%v = %v after one conversion, was %v", converted, got, before)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if got := counter(fams, "imagepipe_messages_total", map[string]string{"function": "convert", "outcome": "acked"}); got < 1 {
		t.Errorf("imagepipe_messages_total acked = %v", got)
	}
	if got := counter(fams, "imagepipe_output_bytes_total", nil); got < 64<<20 {
		t.Errorf("imagepipe_output_bytes_total = %v, want at least the 64 MiB raw image", got)
	}
}

func TestPauseHoldsNewJobsWhileTheRunningOneCompletesAndResumeContinues(t *testing.T) {
	stackEnv(t)
	pauseStackConvert(t)
	startConvertReplica(t, map[string]string{"IMAGEPIPE_MAX_CONCURRENT_JOBS": "2"})
	res := subscribeResults(t)
	dir := t.TempDir()
	first, second := "e2e/ops/pause/first.vhdx", "e2e/ops/pause/second.vhdx"

	states := watchState(t, first)
	upload(t, first, makeImage(t, dir, "first.vhdx", "vhdx", "write -P 0xc1 0 4M"), false)
	awaitStarted(t, states)
	for _, s := range ctlJSON[[]events.ReplicaStatus](t, "pause", "--function", "convert") {
		if s.State != events.WorkerPaused {
			t.Errorf("after pause %s is %s", s.Instance, s.State)
		}
	}
	upload(t, second, makeImage(t, dir, "second.vhdx", "vhdx", "write -P 0xc2 0 4M"), false)

	if ev := res.await(t, first, 90*time.Second); ev.Type != events.TypeConverted {
		t.Fatalf("the job running at the pause ended %s: %s", ev.Type, ev.Data)
	}
	// The second job is queued and must stay so while every replica is
	// paused, though the replica has a free slot.
	deadline := time.Now().Add(scaled(30 * time.Second))
	for {
		kv, _ := setup.StatusKV(context.Background(), e2e.js, 1)
		if e, err := kv.Get(context.Background(), events.StatusKey("uploads", second)); err == nil && strings.Contains(string(e.Value()), `"QUEUED"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the second upload was never queued")
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(1500 * time.Millisecond)
	if st := statusOf(t, "uploads", second); st.State != events.StateQueued {
		t.Fatalf("a job started while every convert replica was paused: %+v", st)
	}

	for _, s := range ctlJSON[[]events.ReplicaStatus](t, "resume", "--function", "convert") {
		if s.State != events.WorkerRunning {
			t.Errorf("after resume %s is %s", s.Instance, s.State)
		}
	}
	if ev := res.await(t, second, 90*time.Second); ev.Type != events.TypeConverted {
		t.Fatalf("the held job ended %s after resume: %s", ev.Type, ev.Data)
	}
}

func TestDrainLetsAReplicaFinishItsJobAndExitZeroWithNothingLost(t *testing.T) {
	stackEnv(t)
	pauseStackConvert(t)
	r := startConvertReplica(t, map[string]string{"IMAGEPIPE_MAX_CONCURRENT_JOBS": "1"})
	res := subscribeResults(t)
	dir := t.TempDir()
	first, second := "e2e/ops/drain/first.vmdk", "e2e/ops/drain/second.vmdk"

	states := watchState(t, first)
	upload(t, first, makeImage(t, dir, "first.vmdk", "vmdk", "write -P 0xd1 0 4M"), false)
	upload(t, second, makeImage(t, dir, "second.vmdk", "vmdk", "write -P 0xd2 0 4M"), false)
	awaitStarted(t, states)
	sts := ctlJSON[[]events.ReplicaStatus](t, "drain", "--instance", r.id)
	if len(sts) != 1 || sts[0].State != events.WorkerDraining {
		t.Errorf("drain answered %+v", sts)
	}
	if code := r.exit(t); code != 0 {
		t.Fatalf("a drained replica exited %d:\n%s", code, r.logs.String())
	}
	if ev := res.await(t, first, 60*time.Second); ev.Type != events.TypeConverted {
		t.Fatalf("the job running at the drain ended %s: %s", ev.Type, ev.Data)
	}
	// The job the drained replica never took is still queued, for the
	// stack's replica once it resumes.
	e2e.stack.workers["convert"].Resume()
	if ev := res.await(t, second, 90*time.Second); ev.Type != events.TypeConverted {
		t.Fatalf("the queued job ended %s: %s", ev.Type, ev.Data)
	}
}

func TestFleetStatsStillCountJobsAfterTheReplicaThatRanThemIsGone(t *testing.T) {
	stackEnv(t)
	type report struct {
		Results  fleet.ResultStats     `json:"results"`
		Replicas []events.ReplicaStats `json:"replicas"`
	}
	before := ctlJSON[report](t, "stats").Results

	pauseStackConvert(t)
	r := startConvertReplica(t, nil)
	res := subscribeResults(t)
	dir := t.TempDir()
	// Keys and content of this run's own, so that a repeated run (-count)
	// neither meets the last one's results nor is answered by de-duplication.
	prefix := runPrefix("e2e/ops/stats/")
	good, bad := prefix+"good.vdi", prefix+"bad.vhdx"
	upload(t, good, makeImage(t, dir, "good.vdi", "vdi", "write -P 0xe1 0 1M", fmt.Sprintf("write -P 0x%02x 1M 64k", byte(runs.Add(1)))), false)
	notes := filepath.Join(dir, "bad.vhdx")
	if err := os.WriteFile(notes, bytes.Repeat([]byte("stats test notes, not a disk\n"), 50), 0o600); err != nil {
		t.Fatal(err)
	}
	upload(t, bad, notes, false)
	if ev := res.await(t, good, 90*time.Second); ev.Type != events.TypeConverted {
		t.Fatalf("good upload: %s %s", ev.Type, ev.Data)
	}
	awaitFailure(t, res, bad)

	if got := ctlJSON[[]events.ReplicaStatus](t, "drain", "--instance", r.id); len(got) != 1 {
		t.Fatalf("drain answered %+v", got)
	}
	if code := r.exit(t); code != 0 {
		t.Fatalf("replica exited %d", code)
	}

	after := ctlJSON[report](t, "stats")
	a := after.Results
	if a.Processed < before.Processed+2 || a.Converted < before.Converted+1 || a.Failed < before.Failed+1 {
		t.Errorf("after two more jobs: processed %d→%d, converted %d→%d, failed %d→%d",
			before.Processed, a.Processed, before.Converted, a.Converted, before.Failed, a.Failed)
	}
	if f := a.ByFormat["vdi"]; f == nil || f.Converted < 1 {
		t.Errorf("by format = %+v, want the vdi conversion", a.ByFormat)
	}
	for _, rep := range after.Replicas {
		if rep.Instance == r.id {
			t.Errorf("the drained replica still answers: %+v", rep)
		}
	}
	// Another reader, as any replica or CLI started later, counts the same.
	again := ctlJSON[report](t, "stats").Results
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(again)
	if !bytes.Equal(x, y) {
		t.Errorf("two readers of the results disagree:\n%s\n%s", x, y)
	}
}

func TestUploadCommandFollowsTheJobToItsOutputOrItsSuggestion(t *testing.T) {
	stackEnv(t)
	dir := t.TempDir()
	goodKey, badKey := "e2e/ops/upload/good.vmdk", "e2e/ops/upload/notes.vhdx"
	good := makeImage(t, dir, "good.vmdk", "vmdk", "write -P 0xf1 0 2M")
	r := imagepipe(t, "upload", good, "uploads/"+goodKey)
	if r.code != 0 || strings.TrimSpace(r.stdout) != "images/"+goodKey+".raw" {
		t.Fatalf("upload of a good image exited %d, printed %q\n%s", r.code, r.stdout, r.stderr)
	}
	if !strings.Contains(r.stderr, "READY") {
		t.Errorf("upload did not show the job's states:\n%s", r.stderr)
	}

	notes := filepath.Join(dir, "notes.vhdx")
	if err := os.WriteFile(notes, bytes.Repeat([]byte("upload test notes, not a disk\n"), 50), 0o600); err != nil {
		t.Fatal(err)
	}
	r = imagepipe(t, "upload", notes, "uploads/e2e/ops/upload/")
	if r.code != 1 {
		t.Fatalf("upload of a refused image exited %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	st := statusOf(t, "uploads", badKey)
	if st.Suggestion == "" || !strings.Contains(r.stderr, "suggestion: "+st.Suggestion) {
		t.Errorf("upload's error does not carry the suggestion %q:\n%s", st.Suggestion, r.stderr)
	}
	if lines := strings.Split(strings.TrimSpace(r.stderr), "\n"); !strings.HasPrefix(lines[len(lines)-1], "imagepipe: uploads/"+badKey+" failed") {
		t.Errorf("the error is not one plain last line:\n%s", r.stderr)
	}

	list := imagepipe(t, "ls", "--state", "failed", "--json", "--limit", "0")
	var failed []events.Status
	if list.code != 0 || json.Unmarshal([]byte(list.stdout), &failed) != nil {
		t.Fatalf("ls exited %d: %s%s", list.code, list.stdout, list.stderr)
	}
	var keys []string
	for _, s := range failed {
		keys = append(keys, s.Key)
		if s.State != events.StateFailed {
			t.Errorf("ls --state failed lists %s in %s", s.Key, s.State)
		}
	}
	if !slices.Contains(keys, badKey) || slices.Contains(keys, goodKey) {
		t.Errorf("ls --state failed lists %v", keys)
	}
	if table := imagepipe(t, "ls"); table.code != 0 || !strings.Contains(table.stdout, "uploads/"+goodKey) {
		t.Errorf("ls table lacks %s:\n%s", goodKey, table.stdout)
	}

	if c := imagepipe(t, "ctl", "cancel", "uploads/"+goodKey, "--timeout", "300ms"); c.code != 1 || !strings.Contains(c.stderr, "nothing to cancel") {
		t.Errorf("cancel of a finished job exited %d: %s", c.code, c.stderr)
	}
	if c := imagepipe(t, "ctl", "frobnicate"); c.code != 2 {
		t.Errorf("ctl with an unknown verb exited %d", c.code)
	}
}

func TestInspectRefusesQcow2WithBackingFileAndAcceptsAGoodVhdx(t *testing.T) {
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	r := imagepipe(t, "inspect", top)
	// The verdict is the command's output: on stdout, once; stderr stays empty.
	if r.code != 1 || !strings.Contains(r.stdout, "refused by rule backing-file") || r.stderr != "" {
		t.Errorf("inspect of a qcow2 with a backing file exited %d:\n%s%s", r.code, r.stdout, r.stderr)
	}

	good := makeImage(t, dir, "good.vhdx", "vhdx", "write -P 0x51 0 1M")
	r = imagepipe(t, "inspect", "--json", good)
	var rep inspection
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &rep) != nil {
		t.Fatalf("inspect of a good vhdx exited %d:\n%s%s", r.code, r.stdout, r.stderr)
	}
	if rep.Verdict != "accepted" || rep.Format != "vhdx" || rep.VirtualSize != 64<<20 || rep.FileSize == 0 || len(rep.Checks) < 3 {
		t.Errorf("inspection = %+v", rep)
	}
}
