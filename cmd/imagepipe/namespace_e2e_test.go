package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/ingest"
	"github.com/imagepipe/imagepipe/internal/inspect/ovatest"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/setup"
	"github.com/imagepipe/imagepipe/internal/status"
)

func TestPlainUploadAndOVADiskOfTheSameNameGetDifferentOutputs(t *testing.T) {
	dir := t.TempDir()
	plainImg := makeImage(t, dir, "plain.vmdk", "vmdk", "write -P 0x51 0 1M")
	ovaImg := makeImage(t, dir, "disk.vmdk", "vmdk", "write -P 0x52 3M 1M")
	wantPlain, _ := localRaw(t, plainImg, "vmdk")
	wantOVA, _ := localRaw(t, ovaImg, "vmdk")
	ovaDisk, err := os.ReadFile(ovaImg)
	if err != nil {
		t.Fatal(err)
	}
	res := subscribeResults(t)

	ovaKey := "e2e/namespace/apps/web.ova"
	putObject(t, ovaKey, ovatest.Appliance(t, []ovatest.Member{{Name: "disk.vmdk", Body: ovaDisk}}, nil), nil)
	ova := converted(t, res.await(t, ovaKey, 90*time.Second))
	if want := events.OVADiskKey("", ovaKey, "disk.vmdk", "raw"); ova.OutputKey != want {
		t.Errorf("OVA disk output at %s, want %s", ova.OutputKey, want)
	}

	// The plain upload that used to write the same key, converted after
	// the OVA, so that an overwrite would show in the OVA's output.
	plainKey := ovaKey + "/disk.vmdk"
	upload(t, plainKey, plainImg, false)
	plain := converted(t, res.await(t, plainKey, 90*time.Second))
	if want := events.OutputKey("", plainKey, "raw"); plain.OutputKey != want {
		t.Errorf("plain output at %s, want %s", plain.OutputKey, want)
	}

	if plain.OutputKey == ova.OutputKey {
		t.Fatalf("the plain upload and the OVA's disk share output %s", plain.OutputKey)
	}
	for _, c := range []struct {
		name, key, want string
	}{{"OVA disk", ova.OutputKey, wantOVA}, {"plain upload", plain.OutputKey, wantPlain}} {
		if got, _ := downloadSum(t, "images", c.key); got != c.want {
			t.Errorf("%s output %s holds sha256 %s, want %s", c.name, c.key, got, c.want)
		}
	}
}

func TestUploadUnderTheReservedOVASegmentIsRefused(t *testing.T) {
	dir := t.TempDir()
	img := makeImage(t, dir, "y.vmdk", "vmdk", "write -P 0x53 0 1M")
	res := subscribeResults(t)
	key := "e2e/namespace/x/" + events.OVADisksSegment + "/y.vmdk"
	upload(t, key, img, false)
	f := awaitFailure(t, res, key)
	if f.Rule != ingest.ReasonReservedKey || f.Phase != events.PhaseIntake || !strings.Contains(f.Message, events.OVADisksSegment) {
		t.Errorf("failure %+v, want rule %s at intake naming %s", f, ingest.ReasonReservedKey, events.OVADisksSegment)
	}
	if objectExists(t, "images", events.OutputKey("", key, "raw")) {
		t.Errorf("a refused upload has an output")
	}
	if st := statusOf(t, "uploads", key); st.State != events.StateFailed {
		t.Errorf("status %+v, want FAILED", st)
	}
}

// A key of 1007 to 1018 bytes is accepted, but its plain report key
// ("errors/" + key + ".error.json") is over S3's 1024 bytes.
func TestFailureReportOfAKeyNearS3sLimitIsWritten(t *testing.T) {
	const keyLen = 1015
	// Segments stay under MinIO's 255 bytes each.
	var b strings.Builder
	b.WriteString("e2e/longkey/")
	for b.Len() < keyLen-len(".vhdx")-200 {
		b.WriteString(strings.Repeat("k", 199) + "/")
	}
	b.WriteString(strings.Repeat("n", keyLen-len(".vhdx")-b.Len()) + ".vhdx")
	key := b.String()
	if len(key) != keyLen {
		t.Fatalf("key is %d bytes", len(key))
	}
	res := subscribeResults(t)
	putObject(t, key, bytes.Repeat([]byte("not a disk image\n"), 64), nil)
	f := awaitFailure(t, res, key)

	reportKey, shortened := events.ErrorReportKey(key)
	if !shortened || len(reportKey) > events.MaxKeyLen {
		t.Fatalf("ErrorReportKey = %q (%d bytes), shortened %v", reportKey, len(reportKey), shortened)
	}
	var report struct {
		InputKey           string `json:"input_key"`
		JobID              string `json:"job_id"`
		Rule               string `json:"rule"`
		ReportKeyShortened bool   `json:"report_key_shortened"`
	}
	// The report is written just before the failure is published.
	deadline := time.Now().Add(scaled(10 * time.Second))
	for {
		obj, err := e2e.s3.GetObject(context.Background(), "uploads", reportKey, minio.GetObjectOptions{})
		if err == nil {
			err = json.NewDecoder(obj).Decode(&report)
			obj.Close()
		}
		if err == nil {
			break
		}
		if !objstore.IsNotFound(err) || time.Now().After(deadline) {
			t.Fatalf("error report %s: %v", reportKey, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if report.InputKey != key || report.JobID != f.JobID || report.Rule != f.Rule || !report.ReportKeyShortened {
		t.Errorf("report %+v; want the whole key, job %s, rule %s, and report_key_shortened", report, f.JobID, f.Rule)
	}
}

// sideStack is a second `imagepipe dev` stack, with its own NATS and
// MinIO, for a test that needs settings the shared stack does not have.
type sideStack struct {
	d  *devStack
	nc *nats.Conn
	js jetstream.JetStream
	s3 *minio.Client
}

func startSideStack(t *testing.T, configure func(*settings)) *sideStack {
	t.Helper()
	s := e2e.stack.s
	s.Convert.ScratchDir = t.TempDir()
	s.Notify.SlackWebhookURL = ""
	configure(&s)
	logFile, err := os.Create(filepath.Join(t.TempDir(), "side.log"))
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(logFile, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, cancel := context.WithCancel(context.Background())
	d, err := startDev(ctx, devOptions{DataDir: t.TempDir(), NATSPort: -1, Settings: s}, log)
	if err != nil {
		cancel()
		t.Fatalf("start a second stack: %v", err)
	}
	var wg sync.WaitGroup
	wg.Go(func() { d.Run(ctx, context.Background()) })
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		d.Close()
		logFile.Close()
		if t.Failed() {
			if b, err := os.ReadFile(logFile.Name()); err == nil {
				t.Logf("second stack's log (tail):\n%s", b[max(0, len(b)-8000):])
			}
		}
	})
	side := &sideStack{d: d}
	if side.nc, err = nats.Connect(d.s.NATS.URL); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(side.nc.Close)
	side.js, _ = jetstream.New(side.nc)
	store, err := objstore.New(d.s.S3)
	if err != nil {
		t.Fatal(err)
	}
	side.s3 = store.Client()
	return side
}

// await returns the first final result whose subject is key.
func (s *sideStack) await(t *testing.T, ch <-chan *nats.Msg, key string, timeout time.Duration) events.Event {
	t.Helper()
	deadline := time.After(scaled(timeout))
	for {
		select {
		case m := <-ch:
			ev, err := events.Decode(m.Data)
			if err != nil {
				t.Fatal(err)
			}
			var f events.Failed
			if ev.Type == events.TypeFailed && ev.DecodeData(events.TypeFailed, &f) == nil && f.WillRetry {
				continue
			}
			if ev.Subject == key {
				return ev
			}
		case <-deadline:
			t.Fatalf("no result for %s within %s", key, timeout)
		}
	}
}

func (s *sideStack) results(t *testing.T) <-chan *nats.Msg {
	t.Helper()
	ch := make(chan *nats.Msg, 64)
	sub, err := s.nc.ChanSubscribe(events.SubjectResults, ch)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := s.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return ch
}

func (s *sideStack) put(t *testing.T, bucket, key string, body []byte) {
	t.Helper()
	if _, err := s.s3.PutObject(context.Background(), bucket, key, bytes.NewReader(body), int64(len(body)),
		minio.PutObjectOptions{DisableMultipart: true}); err != nil {
		t.Fatalf("upload %s: %v", key, err)
	}
}

func (s *sideStack) sum(t *testing.T, bucket, key string) string {
	t.Helper()
	obj, err := s.s3.GetObject(context.Background(), bucket, key, minio.GetObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer obj.Close()
	h := sha256.New()
	if _, err := io.Copy(h, obj); err != nil {
		t.Fatalf("download %s/%s: %v", bucket, key, err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// reconcile runs one reconcile pass on the stack's ingest, as `imagepipe
// reconcile` does.
func (s *sideStack) reconcile(t *testing.T) events.ReconcileResult {
	t.Helper()
	body, _ := json.Marshal(events.ReconcileRequest{})
	ctx, cancel := context.WithTimeout(context.Background(), scaled(30*time.Second))
	defer cancel()
	msg, err := s.nc.RequestWithContext(ctx, events.SubjectReconcile, body)
	if err != nil {
		t.Fatal(err)
	}
	var res events.ReconcileResult
	if err := json.Unmarshal(msg.Data, &res); err != nil {
		t.Fatalf("reconcile reply %s: %v", msg.Data, err)
	}
	return res
}

// ingestIdle waits until ingest has settled every notification MinIO sent.
func (s *sideStack) ingestIdle(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(scaled(30 * time.Second))
	for {
		c, err := s.js.Consumer(context.Background(), events.StreamS3Events, "ingest")
		if err != nil {
			t.Fatal(err)
		}
		info, err := c.Info(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if info.NumPending == 0 && info.NumAckPending == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("ingest still has %d pending and %d unacknowledged notifications", info.NumPending, info.NumAckPending)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestOneBucketForUploadsAndOutputsKeepsOutputsUnderThePrefix(t *testing.T) {
	const bucket = "shared"
	side := startSideStack(t, func(s *settings) {
		s.Ingest.InputBucket, s.Ingest.OutputBucket, s.Convert.OutputBucket = bucket, bucket, bucket
		s.Convert.OutputPrefix = "converted" // the "/" is added at start-up
	})
	dir := t.TempDir()
	img := makeImage(t, dir, "a.vhdx", "vhdx", "write -P 0x61 0 1M", "write -P 0x62 9M 1M")
	want, _ := localRaw(t, img, "vhdx")
	body, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	// The user's own file that a conversion of a.vhdx used to overwrite:
	// a raw image, which is itself an upload to convert.
	own := bytes.Repeat([]byte("the user's own raw image, 512 bytes a line, not an output......\n"), 8*1024)
	ownSum := sha256.Sum256(own)
	ch := side.results(t)
	side.put(t, bucket, "a.vhdx.raw", own)
	ownResult := converted(t, side.await(t, ch, "a.vhdx.raw", 60*time.Second))

	side.put(t, bucket, "a.vhdx", body)
	c := converted(t, side.await(t, ch, "a.vhdx", 90*time.Second))
	if c.OutputBucket != bucket || c.OutputKey != "converted/a.vhdx.raw" {
		t.Errorf("output at %s/%s, want %s/converted/a.vhdx.raw", c.OutputBucket, c.OutputKey, bucket)
	}
	if got := side.sum(t, bucket, c.OutputKey); got != want || c.SHA256 != want {
		t.Errorf("output holds sha256 %s (event %s), want %s", got, c.SHA256, want)
	}
	if got := side.sum(t, bucket, "a.vhdx.raw"); got != hex.EncodeToString(ownSum[:]) {
		t.Errorf("the user's a.vhdx.raw was overwritten: sha256 %s", got)
	}
	if ownResult.OutputKey != "converted/a.vhdx.raw.raw" {
		t.Errorf("the user's raw upload was copied to %s, want converted/a.vhdx.raw.raw", ownResult.OutputKey)
	}

	// Neither output was taken in as an upload: once ingest has settled
	// every notification, no status record exists for them.
	side.ingestIdle(t)
	kv, err := setup.StatusKV(context.Background(), side.js, 1)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{c.OutputKey, ownResult.OutputKey} {
		if st, err := status.New(kv, nil).Get(context.Background(), bucket, key); !errors.Is(err, status.ErrNotFound) {
			t.Errorf("output %s was taken in as an upload: %+v, %v", key, st, err)
		}
	}
	// Reconcile, which lists the whole bucket, leaves them alone too.
	res := side.reconcile(t)
	if res.Listed < 4 {
		t.Errorf("reconcile listed %d objects, want the 2 uploads and 2 outputs", res.Listed)
	}
	for _, k := range res.Keys {
		if strings.HasPrefix(k, "converted/") {
			t.Errorf("reconcile queued the output %s", k)
		}
	}
}

func TestOneBucketWithoutAnOutputPrefixIsRefusedAtStartUp(t *testing.T) {
	// Nothing may be reached: a start-up that got past the check would
	// fail on these instead, with another message.
	t.Setenv("IMAGEPIPE_NATS_URL", "nats://127.0.0.1:1")
	t.Setenv("IMAGEPIPE_S3_ENDPOINT", "127.0.0.1:1")
	t.Setenv("IMAGEPIPE_S3_ACCESS_KEY", "layout-test")
	t.Setenv("IMAGEPIPE_S3_SECRET_KEY", "layout-test-secret")
	notADir := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(notADir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		prefix string
		want   []string
	}{
		{"", []string{"IMAGEPIPE_INPUT_BUCKET", "IMAGEPIPE_OUTPUT_BUCKET", `"same"`, "set IMAGEPIPE_OUTPUT_PREFIX"}},
		{"errors/", []string{"IMAGEPIPE_OUTPUT_PREFIX", "overlaps errors/"}},
	}
	for _, tc := range cases {
		t.Setenv("IMAGEPIPE_INPUT_BUCKET", "same")
		t.Setenv("IMAGEPIPE_OUTPUT_BUCKET", "same")
		t.Setenv("IMAGEPIPE_OUTPUT_PREFIX", tc.prefix)
		for _, args := range [][]string{{"ingest"}, {"convert"}, {"setup"}, {"dev", "--data", filepath.Join(notADir, "data"), "--nats-port", "-1"}} {
			var stdout, stderr bytes.Buffer
			start := time.Now()
			code := run(args, &stdout, &stderr)
			if code != 1 {
				t.Errorf("prefix %q: imagepipe %s exited %d, want 1; stderr:\n%s", tc.prefix, args[0], code, stderr.String())
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr.String(), w) {
					t.Errorf("prefix %q: imagepipe %s: stderr does not say %q:\n%s", tc.prefix, args[0], w, stderr.String())
				}
			}
			if took := time.Since(start); took > 5*time.Second {
				t.Errorf("imagepipe %s took %s to refuse: not checked at start-up", args[0], took)
			}
		}
	}
	// The same bucket with a prefix is a layout that starts (here as far
	// as NATS, which is not there).
	t.Setenv("IMAGEPIPE_OUTPUT_PREFIX", "converted/")
	var stderr bytes.Buffer
	if code := run([]string{"dev", "--data", filepath.Join(notADir, "data"), "--nats-port", "-1"}, &bytes.Buffer{}, &stderr); code != 1 ||
		strings.Contains(stderr.String(), "IMAGEPIPE_OUTPUT_PREFIX") {
		t.Errorf("dev with a prefix: exit %d, stderr:\n%s", code, stderr.String())
	}
}
