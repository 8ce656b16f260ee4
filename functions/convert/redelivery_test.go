package convert

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
	"github.com/imagepipe/imagepipe/internal/setup/setuptest"
	"github.com/imagepipe/imagepipe/internal/status"
	"github.com/imagepipe/imagepipe/test/stack"
)

// countingQemu is the real qemu-img, counting the conversions it runs.
// With hold set, the first conversion waits, after telling held, until
// hold is closed.
type countingQemu struct {
	QemuImg
	converts   atomic.Int32
	held, hold chan struct{}
}

var _ QemuImg = (*countingQemu)(nil)

func (q *countingQemu) Convert(ctx context.Context, src, srcFormat, dst, dstFormat string, onProgress func(float64)) error {
	if q.converts.Add(1) == 1 && q.hold != nil {
		close(q.held)
		<-q.hold
	}
	return q.QemuImg.Convert(ctx, src, srcFormat, dst, dstFormat, onProgress)
}

func (q *countingQemu) ConvertToNBD(ctx context.Context, src, srcFormat, socket string, onProgress func(float64)) error {
	q.converts.Add(1)
	return q.QemuImg.ConvertToNBD(ctx, src, srcFormat, socket, onProgress)
}

// realStack is what a convert replica talks to, on the package's MinIO.
type realStack struct{ *setuptest.Stack }

func TestMain(m *testing.M) { stack.Main(m) }

func startRealStack(t *testing.T) *realStack {
	t.Helper()
	return &realStack{setuptest.Start(t, stack.PackageMinIO(t))}
}

// watchStates records every state the status key takes, as `imagepipe
// watch` and any KV watcher see them.
type watchStates struct {
	w    jetstream.KeyWatcher
	seen []events.State
	last uint64
}

func watchKey(t *testing.T, kv jetstream.KeyValue, bucket, key string) *watchStates {
	t.Helper()
	w, err := kv.Watch(context.Background(), events.StatusKey(bucket, key), jetstream.IncludeHistory())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.Stop() })
	return &watchStates{w: w}
}

// until reads updates until the watcher has seen revision rev.
func (ws *watchStates) until(t *testing.T, rev uint64) []events.State {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for ws.last < rev {
		select {
		case e := <-ws.w.Updates():
			if e == nil {
				continue // the end of the history already stored
			}
			var st events.Status
			if err := json.Unmarshal(e.Value(), &st); err != nil {
				t.Fatal(err)
			}
			ws.seen, ws.last = append(ws.seen, st.State), e.Revision()
		case <-timeout:
			t.Fatalf("watcher saw revision %d, want %d", ws.last, rev)
		}
	}
	return ws.seen
}

func count(states []events.State, s events.State) int {
	n := 0
	for _, x := range states {
		if x == s {
			n++
		}
	}
	return n
}

// A job whose ack was lost comes again after it succeeded. The second
// delivery finds the output in place: it converts nothing, leaves the
// status as the first one left it, and publishes the same result, which
// JetStream drops as a copy.
func TestJobDeliveredAgainAfterItSucceededIsReadyOnceAndConvertedOnce(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s, job, rawSHA := queuedVHDX(ctx, t)
	watch := watchKey(t, s.KV, job.Bucket, job.Key)
	qemu := &countingQemu{QemuImg: qemuimg.New(nil)}
	h := s.handler(t, qemu)

	var ids []string
	for attempt := 1; attempt <= 2; attempt++ {
		out, err := h.Handle(ctx, job, attempt, 4)
		if err != nil {
			t.Fatalf("delivery %d: %v", attempt, err)
		}
		if len(out) != 1 || out[0].Subject != events.SubjectConverted {
			t.Fatalf("delivery %d published %+v, want one converted event", attempt, out)
		}
		if err := natsrt.Publish(ctx, s.JS, out...); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, out[0].Event.ID)
	}

	if n := qemu.converts.Load(); n != 1 {
		t.Errorf("qemu-img converted %d times, want once", n)
	}
	if ids[0] != ids[1] {
		t.Errorf("result event ids %q and %q, want the same id from both deliveries", ids[0], ids[1])
	}
	s.checkReadyOnce(ctx, t, watch, job)
	s.checkOneResult(ctx, t)
	if sum := storedSHA256(t, s.Store, s.Out, "disks/win.vhdx.raw"); sum != rawSHA {
		t.Errorf("output sha256 %s, want %s (qemu-img's own conversion)", sum, rawSHA)
	}
}

func storedSHA256(t *testing.T, store *objstore.Store, bucket, key string) string {
	t.Helper()
	rc, _, err := store.Open(context.Background(), bucket, key, "", "")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	h := sha256.New()
	if _, err := io.Copy(h, rc); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// queuedVHDX uploads a VHDX to a fresh stack and queues its job as ingest
// does; rawSHA is the sha256 of qemu-img's own conversion of it.
func queuedVHDX(ctx context.Context, t *testing.T) (s *realStack, job events.ConvertJob, rawSHA string) {
	t.Helper()
	s = startRealStack(t)
	body, rawSHA := vhdxWithScatteredData(t)
	return s, s.queue(ctx, t, "disks/win.vhdx", body), rawSHA
}

// queue uploads body to key in the input bucket and queues its job as
// ingest does: job id from the upload's ETag, status QUEUED.
func (s *realStack) queue(ctx context.Context, t *testing.T, key string, body []byte) events.ConvertJob {
	t.Helper()
	if err := s.Store.PutBytes(ctx, s.In, key, body, "application/octet-stream", nil); err != nil {
		t.Fatal(err)
	}
	up, err := s.Store.Stat(ctx, s.In, key)
	if err != nil {
		t.Fatal(err)
	}
	job := events.ConvertJob{JobID: events.JobIDFor(s.In + "/" + key + "@" + up.ETag), Bucket: s.In, Key: key,
		VersionID: up.VersionID, ETag: up.ETag, Size: up.Size, QueuedAt: time.Now().UTC()}
	if err := status.New(s.KV, nil).Queue(ctx, events.Status{Bucket: job.Bucket, Key: job.Key, JobID: job.JobID}); err != nil {
		t.Fatal(err)
	}
	return job
}

func (s *realStack) handler(t *testing.T, qemu QemuImg) *Handler {
	t.Helper()
	cfg := Config{OutputBucket: s.Out, OutputFormat: "raw", ScratchDir: t.TempDir(), MaxVirtualSize: 1 << 40,
		ConvertTimeoutBase: time.Minute, ConvertTimeoutPerGiB: time.Minute, AckWait: time.Minute}
	return New(cfg, s.Store, qemu, status.New(s.KV, nil), nil, slog.New(slog.DiscardHandler))
}

// checkReadyOnce asserts that the job's status became READY exactly once
// and stayed so.
func (s *realStack) checkReadyOnce(ctx context.Context, t *testing.T, watch *watchStates, job events.ConvertJob) {
	t.Helper()
	entry, err := s.KV.Get(ctx, events.StatusKey(job.Bucket, job.Key))
	if err != nil {
		t.Fatal(err)
	}
	states := watch.until(t, entry.Revision())
	if n := count(states, events.StateReady); n != 1 {
		t.Errorf("status became READY %d times (%v), want exactly once", n, states)
	}
	if last := states[len(states)-1]; last != events.StateReady {
		t.Errorf("status ends %s (%v), want READY", last, states)
	}
}

// checkOneResult asserts that RESULTS holds one converted event.
func (s *realStack) checkOneResult(ctx context.Context, t *testing.T) {
	t.Helper()
	s.checkOneEvent(ctx, t, events.SubjectConverted)
}

// checkOneEvent asserts that RESULTS holds one event on subject.
func (s *realStack) checkOneEvent(ctx context.Context, t *testing.T, subject string) {
	t.Helper()
	results, err := s.JS.Stream(ctx, events.StreamResults)
	if err != nil {
		t.Fatal(err)
	}
	info, err := results.Info(ctx, jetstream.WithSubjectFilter(subject))
	if err != nil {
		t.Fatal(err)
	}
	if n := info.State.Msgs; n != 1 {
		t.Errorf("%d events on %s in %s, want 1", n, subject, events.StreamResults)
	}
}

// A job handed out again while its first delivery still converts (the
// keep-alives of that delivery lost to a NATS leader change) leaves the
// work to it: the second delivery converts nothing and writes no status,
// and the one after it, once the first finished, finds the output done.
func TestJobDeliveredAgainWhileItsFirstDeliveryConvertsIsLeftToIt(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s, job, rawSHA := queuedVHDX(ctx, t)
	watch := watchKey(t, s.KV, job.Bucket, job.Key)
	qemu := &countingQemu{QemuImg: qemuimg.New(nil), held: make(chan struct{}), hold: make(chan struct{})}
	h := s.handler(t, qemu)

	type handled struct {
		out []events.Message
		err error
	}
	first := make(chan handled, 1)
	go func() {
		out, err := h.Handle(ctx, job, 1, 4)
		first <- handled{out, err}
	}()
	select {
	case <-qemu.held:
	case r := <-first:
		t.Fatalf("first delivery ended before it converted: %v", r.err)
	}
	before, err := s.KV.Get(ctx, events.StatusKey(job.Bucket, job.Key))
	if err != nil {
		t.Fatal(err)
	}

	out, err := h.Handle(ctx, job, 2, 4)
	if err == nil || failure.IsPermanent(err) || len(out) != 0 {
		t.Fatalf("second delivery returned %d events and error %v, want none and a retryable error", len(out), err)
	}
	if n := qemu.converts.Load(); n != 1 {
		t.Fatalf("qemu-img started %d conversions, want only the first delivery's", n)
	}
	after, err := s.KV.Get(ctx, events.StatusKey(job.Bucket, job.Key))
	if err != nil {
		t.Fatal(err)
	}
	if after.Revision() != before.Revision() {
		t.Fatalf("second delivery moved the status record (revision %d to %d)", before.Revision(), after.Revision())
	}

	close(qemu.hold)
	r := <-first
	if r.err != nil {
		t.Fatalf("first delivery: %v", r.err)
	}
	third, err := h.Handle(ctx, job, 3, 4)
	if err != nil {
		t.Fatalf("third delivery: %v", err)
	}
	if len(third) != 1 || len(r.out) != 1 || third[0].Event.ID != r.out[0].Event.ID {
		t.Fatalf("third delivery published %+v, want the first one's result %+v again", third, r.out)
	}
	if err := natsrt.Publish(ctx, s.JS, append(r.out, third...)...); err != nil {
		t.Fatal(err)
	}
	if n := qemu.converts.Load(); n != 1 {
		t.Errorf("qemu-img converted %d times, want once", n)
	}
	s.checkReadyOnce(ctx, t, watch, job)
	s.checkOneResult(ctx, t)
	if sum := storedSHA256(t, s.Store, s.Out, "disks/win.vhdx.raw"); sum != rawSHA {
		t.Errorf("output sha256 %s, want %s (qemu-img's own conversion)", sum, rawSHA)
	}
}

// A job failed for good whose term was lost (to a NATS restart) comes
// again. The second delivery runs no stage: it reads nothing from S3,
// leaves the status record as the first left it, and publishes the first
// delivery's failure again under its id, so RESULTS and every subscriber
// get one final failure. A later upload of the same bytes, which starts at
// attempt 1, is judged again.
func TestJobDeliveredAgainAfterItFailedForGoodReportsTheOneFailureAgain(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s := startRealStack(t)
	job := s.queue(ctx, t, "disks/notes.vhdx", []byte(strings.Repeat("hello\n", 1000)))
	key := events.StatusKey(job.Bucket, job.Key)

	deliver := func(attempt int) (events.Failed, string, map[string]int) {
		t.Helper()
		h, _, logs := s.countingHandler(t)
		out, err := h.Handle(ctx, job, attempt, 4)
		if !failure.IsPermanent(err) || len(out) != 1 || out[0].Subject != events.SubjectFailed {
			t.Fatalf("delivery %d returned %+v, %v; want one failed event and a permanent error", attempt, out, err)
		}
		if err := natsrt.Publish(ctx, s.JS, out...); err != nil {
			t.Fatal(err)
		}
		var f events.Failed
		if err := out[0].Event.DecodeData(events.TypeFailed, &f); err != nil {
			t.Fatal(err)
		}
		return f, out[0].Event.ID, requestCounts(t, logs)
	}

	first, firstID, _ := deliver(1)
	if first.Rule != events.RuleExtensionMismatch || first.WillRetry || first.Attempt != 1 {
		t.Fatalf("first delivery's failure %+v, want rule %s, attempt 1, no retry", first, events.RuleExtensionMismatch)
	}
	recorded, err := s.KV.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}

	again, againID, reqs := deliver(2)
	if againID != firstID {
		t.Errorf("second delivery's event id %s, want the first's %s", againID, firstID)
	}
	if again.Rule != first.Rule || again.Phase != first.Phase || again.Message != first.Message ||
		again.Suggestion != first.Suggestion || again.Attempt != 1 || again.WillRetry || again.InputFormat != first.InputFormat {
		t.Errorf("second delivery reported %+v, want the first's failure %+v", again, first)
	}
	if reqs[reqGet] != 0 || reqs[reqStat] != 0 || reqs[reqKVPut] != 0 || reqs[reqPut] != 0 {
		t.Errorf("second delivery made requests %v, want none but reading the status", reqs)
	}
	if now, err := s.KV.Get(ctx, key); err != nil || now.Revision() != recorded.Revision() {
		t.Errorf("second delivery moved the status record: %v", err)
	}
	s.checkOneEvent(ctx, t, events.SubjectFailed)

	// The same bytes uploaded again: a new message, attempt 1, judged
	// again (and refused again, under the first attempt's id).
	_, reID, reqs := deliver(1)
	if reqs[reqGet] == 0 {
		t.Errorf("an upload of the same bytes was not read again: requests %v", reqs)
	}
	if reID != firstID {
		t.Errorf("the same bytes' failure at attempt 1 has id %s, want %s", reID, firstID)
	}
}
