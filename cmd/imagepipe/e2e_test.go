package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/setup"
	"github.com/imagepipe/imagepipe/internal/status"
	"github.com/imagepipe/imagepipe/test/stack"
)

// The end-to-end tests run the real wiring of `imagepipe dev`: embedded
// JetStream, a MinIO child process, qemu-img, and all three functions.
var e2e struct {
	stack   *devStack
	scratch string
	log     string // the stack's log file
	slack   *slackRecorder
	nc      *nats.Conn
	js      jetstream.JetStream
	s3      *minio.Client
}

func TestMain(m *testing.M) { os.Exit(runE2E(m)) }

func runE2E(m *testing.M) int {
	dir, err := os.MkdirTemp("", "imagepipe-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)

	s, err := loadSettings()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	s.S3.AccessKey, s.S3.SecretKey = "imagepipe-test", "imagepipe-test-secret"
	s.Convert.ScratchDir = filepath.Join(dir, "scratch")
	s.Convert.RetryBackoff = time.Second
	s.Convert.AckWait = 10 * time.Second
	allowLoopbackImports(&s.Ingest) // the import tests serve from loopback
	if err := os.MkdirAll(s.Convert.ScratchDir, 0o700); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	e2e.scratch = s.Convert.ScratchDir
	e2e.log = filepath.Join(dir, "imagepipe.log")

	// A Slack incoming webhook on loopback, so notifications go through
	// the real notify function end to end.
	e2e.slack = newSlackRecorder()
	defer e2e.slack.srv.Close()
	s.Notify.SlackWebhookURL = e2e.slack.srv.URL + "/services/T000/B000/XXXX"
	s.Notify.NotifyOn = []string{"success", "failure", "stalled"}

	logFile, err := os.Create(e2e.log)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	log := slog.New(slog.NewTextHandler(logFile, &slog.HandlerOptions{Level: slog.LevelDebug}))

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stack, err := startDev(ctx, devOptions{DataDir: filepath.Join(dir, "data"), NATSPort: -1, Settings: s}, log)
	if err != nil {
		fmt.Fprintln(os.Stderr, "start stack:", err)
		return 1
	}
	defer stack.Close()
	e2e.stack = stack

	var wg sync.WaitGroup
	wg.Go(func() { stack.Run(ctx, context.Background()) })

	e2e.nc, err = nats.Connect(stack.s.NATS.URL)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer e2e.nc.Close()
	e2e.js, _ = jetstream.New(e2e.nc)
	store, err := objstore.New(stack.s.S3)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	e2e.s3 = store.Client()

	code := m.Run()
	cancel()
	wg.Wait()
	if code != 0 {
		logFile.Close()
		if b, err := os.ReadFile(logFile.Name()); err == nil {
			tail := b[max(0, len(b)-20000):]
			fmt.Fprintf(os.Stderr, "--- imagepipe log (tail) ---\n%s\n", tail)
		}
	}
	return code
}

// scaled is a test deadline as written for an idle machine, stretched by
// IMAGEPIPE_TEST_SCALE (see stack.Scaled), which `go tool task stress`
// raises while it keeps every core busy.
func scaled(d time.Duration) time.Duration { return stack.Scaled(d) }

// makeImage builds a disk image of the given format in dir with qemu-img
// and fills it with distinct patterns with qemu-io, so a conversion that
// loses or moves data changes the output's checksum.
func makeImage(t *testing.T, dir, name, format string, writes ...string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	runTool(t, "qemu-img", "create", "-q", "-f", format, path, "64M")
	args := []string{"-f", format}
	for _, w := range writes {
		args = append(args, "-c", w)
	}
	runTool(t, "qemu-io", append(args, path)...)
	return path
}

func runTool(t *testing.T, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// localRaw is what `qemu-img convert -O raw` makes of the file here: its
// sha256 and size.
func localRaw(t *testing.T, path, format string) (string, int64) {
	t.Helper()
	sum, size, err := stack.LocalRaw(context.Background(), path, format, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return sum, size
}

func fileSum(t *testing.T, path string) string {
	t.Helper()
	sum, _, err := stack.FileSHA256(path)
	if err != nil {
		t.Fatal(err)
	}
	return sum
}

// results subscribes to every result before an upload, so none is missed.
type results struct {
	sub     *nats.Subscription
	ch      chan *nats.Msg
	pending []events.Event // final events already received, not yet awaited
}

func subscribeResults(t *testing.T) *results {
	t.Helper()
	r := &results{}
	r.ch, r.sub = subscribeUntilEnd(t, events.SubjectResults, 256)
	return r
}

// subscribeUntilEnd delivers every message on subject, to a channel that
// holds buffer of them, from the time it returns (the server has the
// subscription) until the test ends.
func subscribeUntilEnd(t *testing.T, subject string, buffer int) (chan *nats.Msg, *nats.Subscription) {
	t.Helper()
	ch := make(chan *nats.Msg, buffer)
	sub, err := e2e.nc.ChanSubscribe(subject, ch)
	if err != nil {
		t.Fatal(err)
	}
	if err := e2e.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return ch, sub
}

// await returns the first final result event whose subject is key; events
// for other keys are kept for their own await.
func (r *results) await(t *testing.T, key string, timeout time.Duration) events.Event {
	t.Helper()
	for i, ev := range r.pending {
		if ev.Subject == key {
			r.pending = append(r.pending[:i], r.pending[i+1:]...)
			return ev
		}
	}
	deadline := time.After(scaled(timeout))
	for {
		select {
		case m := <-r.ch:
			ev, err := events.Decode(m.Data)
			if err != nil {
				t.Fatalf("result on %s is not a CloudEvent: %v", m.Subject, err)
			}
			if ev.Type == events.TypeFailed {
				var f events.Failed
				if err := ev.DecodeData(events.TypeFailed, &f); err == nil && f.WillRetry {
					continue
				}
			}
			if ev.Subject != key {
				r.pending = append(r.pending, ev)
				continue
			}
			return ev
		case <-deadline:
			t.Fatalf("no result for %s within %s", key, timeout)
		}
	}
}

func upload(t *testing.T, key, path string, multipart bool) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, _ := f.Stat()
	opts := minio.PutObjectOptions{ContentType: "application/octet-stream"}
	if multipart {
		if st.Size() <= 5<<20 {
			t.Fatalf("%s is %d bytes, too small for a multipart upload", path, st.Size())
		}
		opts.PartSize = 5 << 20
	} else {
		opts.DisableMultipart = true
	}
	info, err := e2e.s3.PutObject(context.Background(), "uploads", key, f, st.Size(), opts)
	if err != nil {
		t.Fatalf("upload %s: %v", key, err)
	}
	if multipart != strings.Contains(info.ETag, "-") {
		t.Fatalf("upload of %s: multipart=%v but ETag %q", key, multipart, info.ETag)
	}
}

func downloadSum(t *testing.T, bucket, key string) (string, int64) {
	t.Helper()
	obj, err := e2e.s3.GetObject(context.Background(), bucket, key, minio.GetObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer obj.Close()
	h := sha256.New()
	n, err := io.Copy(h, obj)
	if err != nil {
		t.Fatalf("download %s/%s: %v", bucket, key, err)
	}
	return hex.EncodeToString(h.Sum(nil)), n
}

func objectExists(t *testing.T, bucket, key string) bool {
	t.Helper()
	_, err := e2e.s3.StatObject(context.Background(), bucket, key, minio.StatObjectOptions{})
	if err == nil {
		return true
	}
	if objstore.IsNotFound(err) {
		return false
	}
	t.Fatal(err)
	return false
}

func TestUploadsOfEveryFormatBecomeByteIdenticalRawImages(t *testing.T) {
	writes := []string{"write -P 0x11 0 1M", "write -P 0x22 7M 3M", "write -P 0x33 63M 512k"}
	cases := []struct {
		name, format, ext string
		multipart         bool
	}{
		{"vhdx by multipart", "vhdx", "vhdx", true},
		{"vmdk", "vmdk", "vmdk", false},
		{"qcow2", "qcow2", "qcow2", false},
		{"vhd", "vpc", "vhd", false},
		{"vdi", "vdi", "vdi", false},
	}
	res := subscribeResults(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := makeImage(t, dir, "disk."+tc.ext, tc.format, writes...)
			want, wantSize := localRaw(t, path, tc.format)
			key := fmt.Sprintf("e2e/formats/%s/disk.%s", tc.format, tc.ext)

			upload(t, key, path, tc.multipart)
			ev := res.await(t, key, 90*time.Second)
			if ev.Type != events.TypeConverted {
				t.Fatalf("event type %s, want converted: %s", ev.Type, ev.Data)
			}
			var c events.Converted
			if err := ev.DecodeData(events.TypeConverted, &c); err != nil {
				t.Fatal(err)
			}
			if c.OutputBucket != "images" || c.OutputKey != key+".raw" || c.OutputFormat != "raw" {
				t.Errorf("output %s/%s (%s), want images/%s.raw (raw)", c.OutputBucket, c.OutputKey, c.OutputFormat, key)
			}
			// VHD rounds the size up to its disk geometry, so the
			// expected size is the local conversion's, not 64 MiB.
			if c.InputFormat != tc.format || c.VirtualSize != wantSize || c.InputKey != key {
				t.Errorf("input %q format %q virtual size %d", c.InputKey, c.InputFormat, c.VirtualSize)
			}
			if c.SHA256 != want {
				t.Errorf("event sha256 %s, local qemu-img convert gives %s", c.SHA256, want)
			}
			got, size := downloadSum(t, c.OutputBucket, c.OutputKey)
			if got != want || size != c.OutputSize || size != wantSize {
				t.Errorf("stored output sha256 %s size %d; want %s size %d (event says %d)", got, size, want, wantSize, c.OutputSize)
			}
			st := statusOf(t, "uploads", key)
			if st.State != events.StateReady || st.OutputKey != c.OutputKey || st.JobID != c.JobID {
				t.Errorf("status = %+v, want READY with output %s", st, c.OutputKey)
			}
		})
	}
}

func TestLargeRawOutputIsUploadedWhileItConvertsAndMatchesQemuImg(t *testing.T) {
	dir := t.TempDir()
	// Three parts of upload, with data in each and a hole at the end.
	path := filepath.Join(dir, "big.vhdx")
	runTool(t, "qemu-img", "create", "-q", "-f", "vhdx", path, "320M")
	runTool(t, "qemu-io", "-f", "vhdx", "-c", "write -P 0x41 0 2M", "-c", "write -P 0x42 127M 2M",
		"-c", "write -P 0x43 200M 1M", "-c", "write -P 0x44 256M 4k", path)
	want, wantSize := localRaw(t, path, "vhdx")
	res := subscribeResults(t)
	key := "e2e/stream/big.vhdx"
	upload(t, key, path, true)
	ev := res.await(t, key, 120*time.Second)
	var c events.Converted
	if err := ev.DecodeData(events.TypeConverted, &c); err != nil {
		t.Fatalf("%v: %s", err, ev.Data)
	}
	if c.SHA256 != want || c.OutputSize != wantSize || c.OutputSize != 320<<20 {
		t.Errorf("event sha256 %s size %d, want %s size %d", c.SHA256, c.OutputSize, want, wantSize)
	}
	if got, size := downloadSum(t, c.OutputBucket, c.OutputKey); got != want || size != wantSize {
		t.Errorf("stored output sha256 %s size %d, want %s size %d", got, size, want, wantSize)
	}
	if line := logLine(t, c.JobID, "msg=converting"); !strings.Contains(line, "streaming=true") {
		t.Errorf("not uploaded while converting: %s", line)
	}
	if line := logLine(t, c.JobID, "out of order"); line != "" {
		t.Errorf("streaming fell back: %s", line)
	}
	if outputTag(t, c.OutputKey) != want {
		t.Errorf("output tag differs from the event's sha256")
	}
}

// logLine is the first line of the stack's log about job that contains
// what, or "".
func logLine(t *testing.T, job, what string) string {
	t.Helper()
	b, err := os.ReadFile(e2e.log)
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if strings.Contains(line, "job="+job) && strings.Contains(line, what) {
			return line
		}
	}
	return ""
}

func statusOf(t *testing.T, bucket, key string) events.Status {
	t.Helper()
	kv, err := setup.StatusKV(context.Background(), e2e.js, 1)
	if err != nil {
		t.Fatal(err)
	}
	st, err := status.New(kv, nil).Get(context.Background(), bucket, key)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func awaitFailure(t *testing.T, res *results, key string) events.Failed {
	t.Helper()
	ev := res.await(t, key, 60*time.Second)
	if ev.Type != events.TypeFailed {
		t.Fatalf("event type %s, want failed: %s", ev.Type, ev.Data)
	}
	var f events.Failed
	if err := ev.DecodeData(events.TypeFailed, &f); err != nil {
		t.Fatal(err)
	}
	if f.WillRetry {
		t.Errorf("a refusal is retried: %+v", f)
	}
	return f
}

func TestBadUploadsFailWithPhaseAndPlainMessageAndNoOutput(t *testing.T) {
	dir := t.TempDir()
	text := filepath.Join(dir, "notes.vhdx")
	if err := os.WriteFile(text, bytes.Repeat([]byte("meeting notes, not a disk\n"), 100), 0o600); err != nil {
		t.Fatal(err)
	}
	vhdx := makeImage(t, dir, "whole.vhdx", "vhdx", "write -P 0x44 0 2M")
	whole, err := os.ReadFile(vhdx)
	if err != nil {
		t.Fatal(err)
	}
	truncated := filepath.Join(dir, "truncated.vhdx")
	if err := os.WriteFile(truncated, whole[:100<<10], 0o600); err != nil {
		t.Fatal(err)
	}

	res := subscribeResults(t)
	for _, tc := range []struct{ name, path string }{
		{"text file named .vhdx", text},
		{"truncated vhdx", truncated},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key := "e2e/bad/" + filepath.Base(tc.path)
			upload(t, key, tc.path, false)
			f := awaitFailure(t, res, key)
			if f.Phase != events.PhaseInspect || f.Message == "" || f.Suggestion == "" {
				t.Errorf("failure = %+v, want phase inspect with a message and a suggestion", f)
			}
			if objectExists(t, "images", key+".raw") {
				t.Errorf("an output exists for a refused upload")
			}
			if st := statusOf(t, "uploads", key); st.State != events.StateFailed || st.Message != f.Message {
				t.Errorf("status = %+v, want FAILED with the event's message", st)
			}
		})
	}
}

func TestJobForVanishedObjectFailsSayingSo(t *testing.T) {
	res := subscribeResults(t)
	key := "e2e/vanished/gone.qcow2"
	job := events.ConvertJob{JobID: "vanished-1", Bucket: "uploads", Key: key, Size: 1, Reason: "upload", QueuedAt: time.Now()}
	ev, err := events.New("vanished-job-1", events.TypeConvertJob, "/test", key, time.Now(), job)
	if err != nil {
		t.Fatal(err)
	}
	if err := natsrt.Publish(context.Background(), e2e.js, events.Message{Subject: events.SubjectConvertJob, Event: ev}); err != nil {
		t.Fatal(err)
	}
	f := awaitFailure(t, res, key)
	if f.Phase != events.PhaseDownload || !strings.Contains(f.Message, "no longer exists") {
		t.Errorf("failure = %+v, want phase download saying the object no longer exists", f)
	}
}

// ingestSettled waits until ingest has acknowledged everything in
// S3_EVENTS.
func ingestSettled(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(scaled(30 * time.Second))
	for time.Now().Before(deadline) {
		if info := ingestConsumer(ctx, t); info.NumPending == 0 && info.NumAckPending == 0 {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatal("ingest did not settle within 30s")
}

// ingestConsumer is where ingest's consumer of S3_EVENTS stands now.
func ingestConsumer(ctx context.Context, t *testing.T) *jetstream.ConsumerInfo {
	t.Helper()
	c, err := e2e.js.Consumer(ctx, events.StreamS3Events, "ingest")
	if err != nil {
		t.Fatal(err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return info
}

func jobsLastSeq(t *testing.T) uint64 {
	t.Helper()
	s, err := e2e.js.Stream(context.Background(), events.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.LastSeq
}

func TestRepeatedNotificationMakesOneJob(t *testing.T) {
	res := subscribeResults(t)
	dir := t.TempDir()
	path := makeImage(t, dir, "dup.qcow2", "qcow2", "write -P 0x55 0 1M")
	key := "e2e/dup/dup.qcow2"

	// Capture MinIO's own notification for this upload from S3_EVENTS.
	notes := make(chan *nats.Msg, 16)
	sub, err := e2e.nc.ChanSubscribe(events.SubjectS3Events, notes)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	ingestSettled(t)
	before := jobsLastSeq(t)

	upload(t, key, path, false)
	var original []byte
	for original == nil {
		select {
		case m := <-notes:
			if n, err := events.ParseNotification(m.Data); err == nil && n.Records[0].Key == key {
				original = m.Data
			}
		case <-time.After(scaled(30 * time.Second)):
			t.Fatal("no notification from MinIO")
		}
	}
	if ev := res.await(t, key, 60*time.Second); ev.Type != events.TypeConverted {
		t.Fatalf("first conversion: %s %s", ev.Type, ev.Data)
	}
	// MinIO's queue store replays without a message id: the same payload
	// again, as a new stream message.
	if _, err := e2e.js.Publish(context.Background(), events.SubjectS3Events, original); err != nil {
		t.Fatal(err)
	}
	ingestSettled(t)
	if got := jobsLastSeq(t) - before; got != 1 {
		t.Errorf("two notifications of one upload made %d jobs, want 1", got)
	}
}

func TestMalformedNotificationIsAcknowledgedNotRedelivered(t *testing.T) {
	ingestSettled(t)
	before := jobsLastSeq(t)
	for _, p := range []string{`{"EventName":`, `not json at all`, `{"Records":[{"eventName":"s3:ObjectCreated:Put","s3":{"bucket":{"name":"uploads"},"object":{"key":"%zz","size":3}}}]}`} {
		if _, err := e2e.js.Publish(context.Background(), events.SubjectS3Events, []byte(p)); err != nil {
			t.Fatal(err)
		}
	}
	ingestSettled(t)
	c, _ := e2e.js.Consumer(context.Background(), events.StreamS3Events, "ingest")
	info, err := c.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if info.NumRedelivered != 0 {
		t.Errorf("malformed notifications were redelivered %d times", info.NumRedelivered)
	}
	if got := jobsLastSeq(t); got != before {
		t.Errorf("malformed notifications made %d jobs", got-before)
	}
}

func TestScratchFilesNeverOutliveTheirJob(t *testing.T) {
	// Runs after the conversions above (tests run in file order); give any
	// job still finishing a moment.
	deadline := time.Now().Add(scaled(20 * time.Second))
	for {
		entries, err := os.ReadDir(e2e.scratch)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := e2e.js.Consumer(context.Background(), events.StreamJobs, "convert")
		info, _ := c.Info(context.Background())
		if len(entries) == 0 && info != nil && info.NumAckPending == 0 {
			return
		}
		if time.Now().After(deadline) {
			var names []string
			for _, e := range entries {
				names = append(names, e.Name())
			}
			t.Fatalf("scratch dir holds %v after every job ended", names)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// jobCapture keeps the jobs published while it is subscribed, so a test
// can hand one to convert again, as a redelivery would.
type jobCapture struct{ ch chan *nats.Msg }

func captureJobs(t *testing.T) *jobCapture {
	t.Helper()
	ch, _ := subscribeUntilEnd(t, events.SubjectConvertJob, 64)
	return &jobCapture{ch: ch}
}

// republish queues the first captured job for key again, as a new message.
func (c *jobCapture) republish(t *testing.T, key string) {
	t.Helper()
	for {
		select {
		case m := <-c.ch:
			ev, err := events.Decode(m.Data)
			if err != nil {
				t.Fatal(err)
			}
			var j events.ConvertJob
			if err := ev.DecodeData(events.TypeConvertJob, &j); err != nil || j.Key != key {
				continue
			}
			if _, err := e2e.js.Publish(context.Background(), events.SubjectConvertJob, m.Data); err != nil {
				t.Fatal(err)
			}
			c.ch <- m // for the next republish
			return
		case <-time.After(scaled(10 * time.Second)):
			t.Fatalf("no job for %s was published", key)
		}
	}
}

func outputTag(t *testing.T, key string) string {
	t.Helper()
	tg, err := e2e.s3.GetObjectTagging(context.Background(), "images", key, minio.GetObjectTaggingOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tg.ToMap()["imagepipe-sha256"]
}

func TestRedeliveredJobReportsItsTaggedOutputAndReconvertsAnUntaggedOne(t *testing.T) {
	res := subscribeResults(t)
	dir := t.TempDir()
	path := makeImage(t, dir, "again.qcow2", "qcow2", "write -P 0x66 0 2M", "write -P 0x67 40M 1M")
	key := "e2e/again/again.qcow2"
	outKey := key + ".raw"
	want, _ := localRaw(t, path, "qcow2")
	jobs := captureJobs(t)
	upload(t, key, path, false)

	converted := func(step string) events.Converted {
		t.Helper()
		ev := res.await(t, key, 90*time.Second)
		var c events.Converted
		if err := ev.DecodeData(events.TypeConverted, &c); err != nil {
			t.Fatalf("%s: %s %s", step, ev.Type, ev.Data)
		}
		return c
	}
	first := converted("first conversion")
	if first.SHA256 != want {
		t.Fatalf("first conversion sha256 %s, want %s", first.SHA256, want)
	}
	if got, _ := downloadSum(t, "images", outKey); got != want {
		t.Fatalf("uploaded output hashes to %s, the event says %s", got, want)
	}
	if got := outputTag(t, outKey); got != want {
		t.Fatalf("output tag imagepipe-sha256 = %q, want %s", got, want)
	}

	// An output without its hash tag may be a half-finished upload: the
	// redelivered job converts again and tags it.
	if err := e2e.s3.RemoveObjectTagging(context.Background(), "images", outKey, minio.RemoveObjectTaggingOptions{}); err != nil {
		t.Fatal(err)
	}
	jobs.republish(t, key)
	if c := converted("redelivery of an untagged output"); c.SHA256 != want {
		t.Fatalf("reconversion sha256 %s, want %s", c.SHA256, want)
	}
	if got := outputTag(t, outKey); got != want {
		t.Fatalf("after reconversion the tag is %q, want %s", got, want)
	}

	// With the tag in place the output is reported again, not rebuilt:
	// with the input gone, a conversion could only fail.
	if err := e2e.s3.RemoveObject(context.Background(), "uploads", key, minio.RemoveObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	jobs.republish(t, key)
	if c := converted("redelivery of a finished job"); c.SHA256 != want || c.OutputKey != outKey {
		t.Fatalf("redelivered job reported %+v, want the first output again", c)
	}
}

// An output write aborts only its own upload: the parts of another
// writer of the same key (a second version's job, or a replica that died
// mid-write) are not the job's to remove. The dead writer's are left to
// the server (MinIO's stale upload expiry, or a lifecycle rule).
func TestAJobCompletesBesideADeadWritersUploadAndLeavesNoneOfItsOwn(t *testing.T) {
	res := subscribeResults(t)
	dir := t.TempDir()
	ctx := context.Background()
	core := minio.Core{Client: e2e.s3}
	// A raw input is copied server-side, anything else converted and
	// uploaded: both write the output as a multipart upload.
	for _, c := range []struct{ name, format string }{{"died.img", "raw"}, {"died.qcow2", "qcow2"}} {
		path := makeImage(t, dir, c.name, c.format, "write -P 0x44 0 1M")
		key := "e2e/died/" + c.name
		outKey := key + ".raw"
		// What a replica killed mid-write leaves: an upload with a part.
		id, err := core.NewMultipartUpload(ctx, "images", outKey, minio.PutObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = core.AbortMultipartUpload(context.Background(), "images", outKey, id) })
		if _, err := core.PutObjectPart(ctx, "images", outKey, id, 1, bytes.NewReader([]byte("half an output")), 14, minio.PutObjectPartOptions{}); err != nil {
			t.Fatal(err)
		}
		upload(t, key, path, false)
		want, _ := localRaw(t, path, c.format)
		if got := awaitConverted(t, res, key); got.SHA256 != want {
			t.Fatalf("%s: sha256 %s, want %s", key, got.SHA256, want)
		}
		left, err := core.ListMultipartUploads(ctx, "images", outKey, "", "", "", 100)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, u := range left.Uploads {
			if u.Key == outKey {
				ids = append(ids, u.UploadID)
			}
		}
		if len(ids) != 1 || ids[0] != id {
			t.Errorf("%s: incomplete uploads of the output after the job: %v, want only the dead writer's %s", key, ids, id)
		}
	}
}
