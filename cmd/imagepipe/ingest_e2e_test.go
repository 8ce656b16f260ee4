package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/tags"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/ingest"
	"github.com/imagepipe/imagepipe/internal/dedup"
	"github.com/imagepipe/imagepipe/internal/minioserver"
	"github.com/imagepipe/imagepipe/internal/setup"
	"github.com/imagepipe/imagepipe/internal/status"
	"github.com/imagepipe/imagepipe/test/stack"
)

// The intake tests run on the e2e stack; each uses its own keys under
// e2e/intake/.

// smallQcow2 is an 8 MiB qcow2 with one distinct pattern, so that two of
// them never share content (and content de-duplication never joins them)
// unless a test means it to.
func smallQcow2(t *testing.T, name string, pattern byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", path, "8M")
	runTool(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x%02x 1M 512k", pattern), path)
	return path
}

func awaitConverted(t *testing.T, res *results, key string) events.Converted {
	t.Helper()
	ev := res.await(t, key, 90*time.Second)
	if ev.Type != events.TypeConverted {
		t.Fatalf("%s: event %s, want converted: %s", key, ev.Type, ev.Data)
	}
	var c events.Converted
	if err := ev.DecodeData(events.TypeConverted, &c); err != nil {
		t.Fatal(err)
	}
	return c
}

// intakeStats reads ingest's counters the way an operator would: from the
// STATS answer of its micro service.
func intakeStats(t *testing.T) map[string]uint64 {
	t.Helper()
	msg, err := e2e.nc.Request("$SRV.STATS."+events.ServiceIntake, nil, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var st micro.Stats
	if err := json.Unmarshal(msg.Data, &st); err != nil || len(st.Endpoints) == 0 {
		t.Fatalf("STATS answer %s: %v", msg.Data, err)
	}
	var counts map[string]uint64
	if err := json.Unmarshal(st.Endpoints[0].Data, &counts); err != nil {
		t.Fatalf("STATS data %s: %v", st.Endpoints[0].Data, err)
	}
	return counts
}

// awaitStats returns how intake's counters moved since before, once done
// holds or after a few seconds. Seeing a notification on its subject does
// not mean ingest has counted it: the stream and ingest's consumer may
// still be behind.
func awaitStats(t *testing.T, before map[string]uint64, done func(map[string]uint64) bool) map[string]uint64 {
	t.Helper()
	deadline := time.Now().Add(scaled(10 * time.Second))
	for {
		d := statsDelta(before, intakeStats(t))
		if done(d) || time.Now().After(deadline) {
			return d
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func statsDelta(before, after map[string]uint64) map[string]uint64 {
	d := map[string]uint64{}
	for k, v := range after {
		if v != before[k] {
			d[k] = v - before[k]
		}
	}
	return d
}

// forgedNotification is a notification as MinIO would send it, for what
// no real upload can produce: keys MinIO refuses, a terabyte object.
func forgedNotification(event, bucket, key string, size int64) []byte {
	return fmt.Appendf(nil, `{"EventName":%q,"Key":%q,"Records":[{"eventVersion":"2.0","eventSource":"minio:s3",
"eventTime":"2026-11-23T07:45:27.775Z","eventName":%q,"s3":{"bucket":{"name":%q},
"object":{"key":%q,"size":%d,"eTag":"forged-%d","contentType":"application/octet-stream","userMetadata":{"content-type":"application/octet-stream"}}}}]}`,
		event, bucket+"/"+key, event, bucket, url.QueryEscape(key), size, time.Now().UnixNano())
}

func publishRaw(t *testing.T, payload []byte) {
	t.Helper()
	if _, err := e2e.js.Publish(context.Background(), events.SubjectS3Events, payload); err != nil {
		t.Fatal(err)
	}
}

func putBody(t *testing.T, key string, body []byte, meta map[string]string) {
	t.Helper()
	_, err := e2e.s3.PutObject(context.Background(), "uploads", key, bytes.NewReader(body), int64(len(body)),
		minio.PutObjectOptions{ContentType: "application/octet-stream", UserMetadata: meta, DisableMultipart: true})
	if err != nil {
		t.Fatalf("put %s: %v", key, err)
	}
}

func hasStatus(t *testing.T, bucket, key string) bool {
	t.Helper()
	kv, err := setup.StatusKV(context.Background(), e2e.js, 1)
	if err != nil {
		t.Fatal(err)
	}
	_, err = status.New(kv, nil).Get(context.Background(), bucket, key)
	if errors.Is(err, status.ErrNotFound) {
		return false
	}
	if err != nil {
		t.Fatal(err)
	}
	return true
}

// cli runs an imagepipe command against the e2e stack, as an operator
// whose environment points at it would.
func cli(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	t.Setenv("IMAGEPIPE_NATS_URL", e2e.stack.s.NATS.URL)
	var out, errb bytes.Buffer
	code = run(args, &out, &errb)
	return code, out.String(), errb.String()
}

// notifications sees what MinIO publishes on S3_EVENTS. With a queue
// store configured MinIO publishes after the upload returns, so a test
// that asks ingest about an upload waits for its notification first.
type notifications struct{ ch chan *nats.Msg }

func watchNotifications(t *testing.T) *notifications {
	t.Helper()
	ch, _ := subscribeUntilEnd(t, events.SubjectS3Events, 256)
	return &notifications{ch: ch}
}

// await waits for a notification of event (any event when "") for each key.
func (n *notifications) await(t *testing.T, event string, keys ...string) {
	t.Helper()
	missing := map[string]bool{}
	for _, k := range keys {
		missing[k] = true
	}
	deadline := time.After(scaled(20 * time.Second))
	for len(missing) > 0 {
		select {
		case m := <-n.ch:
			if p, err := events.ParseNotification(m.Data); err == nil && (event == "" || p.Records[0].EventName == event) {
				delete(missing, p.Records[0].Key)
			}
		case <-deadline:
			t.Fatalf("no notification from MinIO for %v", missing)
		}
	}
}

// settledJobs waits for ingest to finish with S3_EVENTS and returns how
// many jobs JOBS has ever taken.
func settledJobs(t *testing.T) uint64 {
	t.Helper()
	ingestSettled(t)
	return jobsLastSeq(t)
}

func TestUnusualKeysAreConvertedUnderTheirRealName(t *testing.T) {
	res := subscribeResults(t)
	keys := []string{
		"e2e/intake/keys/with space.qcow2",
		"e2e/intake/keys/a+b=c&d.qcow2",
		"e2e/intake/keys/dísk 日本/ünï.qcow2",
	}
	paths := map[string]string{}
	for i, key := range keys {
		paths[key] = smallQcow2(t, "disk.qcow2", byte(0x61+i))
		upload(t, key, paths[key], false)
	}
	for _, key := range keys {
		c := awaitConverted(t, res, key)
		want, size := localRaw(t, paths[key], "qcow2")
		if c.InputKey != key || c.OutputKey != key+".raw" || c.SHA256 != want {
			t.Errorf("%q: input %q output %q sha256 %s; want the real key, %q and %s", key, c.InputKey, c.OutputKey, c.SHA256, key+".raw", want)
		}
		if got, n := downloadSum(t, "images", key+".raw"); got != want || n != size {
			t.Errorf("%q: stored output sha256 %s (%d bytes), want %s (%d)", key, got, n, want, size)
		}
		if st := statusOf(t, "uploads", key); st.State != events.StateReady || st.Key != key {
			t.Errorf("%q: status %+v, want READY under the real key", key, st)
		}
	}
}

func TestUnsafeKeysAreRefusedAtIntakeAndNeverConverted(t *testing.T) {
	res := subscribeResults(t)
	before := settledJobs(t)

	// MinIO stores control characters in keys; ingest must not pass them on.
	ctlKey := "e2e/intake/unsafe/ctl\x01x\nnewline.qcow2"
	upload(t, ctlKey, smallQcow2(t, "disk.qcow2", 0x70), false)
	// MinIO refuses ".." segments on upload (XMinioInvalidObjectName), so
	// such a key only comes from another S3 service or a forged
	// notification: forge one.
	dotKey := "e2e/intake/unsafe/a/../../../escape.qcow2"
	if _, err := e2e.s3.PutObject(context.Background(), "uploads", dotKey, strings.NewReader("x"), 1, minio.PutObjectOptions{}); err == nil {
		t.Fatal("MinIO stored a key with .. segments; the forged notification below no longer stands for the only way in")
	}
	publishRaw(t, forgedNotification("s3:ObjectCreated:Put", "uploads", dotKey, 4096))

	for _, key := range []string{ctlKey, dotKey} {
		f := awaitFailure(t, res, key)
		if f.Phase != events.PhaseIntake || f.Rule != ingest.ReasonUnsafeKey || f.Message == "" || f.Suggestion == "" || f.InputKey != key {
			t.Errorf("%q: failure %+v, want phase intake, rule unsafe-key, a message and a suggestion", key, f)
		}
		if st := statusOf(t, "uploads", key); st.State != events.StateFailed || st.Phase != events.PhaseIntake || st.Message != f.Message {
			t.Errorf("%q: status %+v, want FAILED at intake", key, st)
		}
	}
	if objectExists(t, "images", ctlKey+".raw") {
		t.Error("an output exists for the key with control characters")
	}
	if got := settledJobs(t) - before; got != 0 {
		t.Errorf("unsafe keys made %d jobs", got)
	}
}

func TestTaggingAnUploadDoesNotConvertItAgain(t *testing.T) {
	res := subscribeResults(t)
	notes := watchNotifications(t)
	before, statsBefore := settledJobs(t), intakeStats(t)

	// Tagged the moment it lands, as `mc cp --tags` does.
	key := "e2e/intake/tagging/disk.qcow2"
	upload(t, key, smallQcow2(t, "disk.qcow2", 0x71), false)
	tg, err := tags.NewTags(map[string]string{"owner": "ops", "tier": "gold"}, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := e2e.s3.PutObjectTagging(context.Background(), "uploads", key, tg, minio.PutObjectTaggingOptions{}); err != nil {
		t.Fatal(err)
	}
	// MinIO does notify the tagging, as an ObjectCreated event.
	notes.await(t, "s3:ObjectCreated:PutTagging", key)
	c := awaitConverted(t, res, key)

	if got := settledJobs(t) - before; got != 1 {
		t.Errorf("an upload and its tagging made %d jobs, want 1", got)
	}
	if d := awaitStats(t, statsBefore, func(d map[string]uint64) bool { return d[ingest.ReasonNotAnUpload] == 1 && d[ingest.ReasonQueued] == 1 }); d[ingest.ReasonNotAnUpload] != 1 || d[ingest.ReasonQueued] != 1 {
		t.Errorf("counters moved by %v, want queued +1 and not-an-upload +1", d)
	}
	if st := statusOf(t, "uploads", key); st.State != events.StateReady || st.JobID != c.JobID {
		t.Errorf("status %+v, want READY from job %s", st, c.JobID)
	}
	select {
	case m := <-res.ch:
		if ev, err := events.Decode(m.Data); err == nil && ev.Subject == key {
			t.Errorf("a second result for %s: %s", key, ev.Data)
		}
	case <-time.After(stack.Scaled(300 * time.Millisecond)):
	}
}

func TestOutputsNeverFeedBackInEvenInTheInputBucket(t *testing.T) {
	res := subscribeResults(t)
	key := "e2e/intake/loop/disk.qcow2"
	upload(t, key, smallQcow2(t, "disk.qcow2", 0x72), false)
	c := awaitConverted(t, res, key)
	notes := watchNotifications(t)
	before, statsBefore := settledJobs(t), intakeStats(t)

	// What IMAGEPIPE_OUTPUT_BUCKET=uploads would do: outputs written into
	// the input bucket, here both a server-side copy of a real output and
	// a fresh object carrying the marker as convert writes it.
	copied := "e2e/intake/loop/copied.qcow2.raw"
	_, err := e2e.s3.CopyObject(context.Background(),
		minio.CopyDestOptions{Bucket: "uploads", Object: copied},
		minio.CopySrcOptions{Bucket: c.OutputBucket, Object: c.OutputKey})
	if err != nil {
		t.Fatal(err)
	}
	written := "e2e/intake/loop/written.qcow2"
	putBody(t, written, []byte("QFI\xfb pretend output"), map[string]string{events.MetaOutput: "true"})
	notes.await(t, "", copied, written)

	if got := settledJobs(t) - before; got != 0 {
		t.Errorf("outputs in the input bucket made %d jobs", got)
	}
	if d := awaitStats(t, statsBefore, func(d map[string]uint64) bool { return d[ingest.ReasonOutput] == 2 }); d[ingest.ReasonOutput] != 2 {
		t.Errorf("counters moved by %v, want imagepipe-output +2", d)
	}
	for _, k := range []string{copied, written} {
		if hasStatus(t, "uploads", k) {
			t.Errorf("%s has a status record", k)
		}
	}
}

func TestIntakeSkipsEmptyObjectsAndFolderMarkersAndRefusesNonImages(t *testing.T) {
	res := subscribeResults(t)
	notes := watchNotifications(t)
	before, statsBefore := settledJobs(t), intakeStats(t)
	keys := map[string][]byte{
		"e2e/intake/filter/readme.txt":        []byte("see the disks beside me\n"),
		"e2e/intake/filter/empty.qcow2":       nil,
		"e2e/intake/filter/folder/":           nil,
		"errors/e2e/intake/filter/disk.qcow2": []byte("not an input"),
	}
	for k, body := range keys {
		putBody(t, k, body, nil)
	}
	notes.await(t, "", slices.Collect(maps.Keys(keys))...)

	if got := settledJobs(t) - before; got != 0 {
		t.Errorf("%d jobs, want none", got)
	}
	want := map[string]uint64{ingest.ReasonExtension: 1, ingest.ReasonEmpty: 1, ingest.ReasonFolderMarker: 1, ingest.ReasonErrorReport: 1}
	if d := awaitStats(t, statsBefore, func(d map[string]uint64) bool { return fmt.Sprint(d) == fmt.Sprint(want) }); fmt.Sprint(d) != fmt.Sprint(want) {
		t.Errorf("counters moved by %v, want %v", d, want)
	}
	// The text file was put where images go: its uploader is told why it
	// is not converted.
	if f := awaitFailure(t, res, "e2e/intake/filter/readme.txt"); f.Rule != ingest.ReasonExtension || f.Phase != events.PhaseIntake {
		t.Errorf("failure %+v, want rule extension at intake", f)
	}
}

func TestUploadOverTheSizeLimitIsRefusedWithTheLimit(t *testing.T) {
	res := subscribeResults(t)
	before := settledJobs(t)
	// Nobody uploads 2 TiB in a test: the notification is forged, the path
	// from S3_EVENTS to the failure event and the status is the real one.
	key := "e2e/intake/size/huge.vhdx"
	publishRaw(t, forgedNotification("s3:ObjectCreated:CompleteMultipartUpload", "uploads", key, 2<<40))
	f := awaitFailure(t, res, key)
	if f.Phase != events.PhaseIntake || f.Rule != ingest.ReasonTooLarge || f.Suggestion == "" {
		t.Errorf("failure %+v, want phase intake, rule max-input-size, a suggestion", f)
	}
	for _, want := range []string{"2.0 TiB", "2199023255552 bytes", "1.0 TiB", "IMAGEPIPE_MAX_INPUT_SIZE"} {
		if !strings.Contains(f.Message, want) {
			t.Errorf("message %q does not say %q", f.Message, want)
		}
	}
	if st := statusOf(t, "uploads", key); st.State != events.StateFailed || st.Message != f.Message {
		t.Errorf("status %+v, want FAILED with the message", st)
	}
	if got := settledJobs(t) - before; got != 0 {
		t.Errorf("%d jobs, want none", got)
	}
}

func TestMultipartUploadInProgressMakesNoJob(t *testing.T) {
	res := subscribeResults(t)
	ctx := context.Background()
	key := runPrefix("e2e/intake/multipart/") + "disk.qcow2"
	path := filepath.Join(t.TempDir(), "disk.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", path, "16M")
	runTool(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x73 0 6M", path)
	body, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if len(body) <= 5<<20 {
		t.Fatalf("image is %d bytes, too small for two parts", len(body))
	}
	notes := watchNotifications(t)
	before := settledJobs(t)

	core := minio.Core{Client: e2e.s3}
	id, err := core.NewMultipartUpload(ctx, "uploads", key, minio.PutObjectOptions{ContentType: "application/octet-stream"})
	if err != nil {
		t.Fatal(err)
	}
	var parts []minio.CompletePart
	for i, chunk := range [][]byte{body[:5<<20], body[5<<20:]} {
		p, err := core.PutObjectPart(ctx, "uploads", key, id, i+1, bytes.NewReader(chunk), int64(len(chunk)), minio.PutObjectPartOptions{})
		if err != nil {
			t.Fatal(err)
		}
		parts = append(parts, minio.CompletePart{PartNumber: p.PartNumber, ETag: p.ETag})
	}
	// Every part is in; the object is not. Whatever a notification would
	// do, it would have done in this time.
	time.Sleep(time.Second)
	if got := settledJobs(t) - before; got != 0 {
		t.Fatalf("%d jobs while the upload is in progress", got)
	}
	if hasStatus(t, "uploads", key) {
		t.Fatal("status record while the upload is in progress")
	}
	for len(notes.ch) > 0 {
		if n, err := events.ParseNotification((<-notes.ch).Data); err == nil && n.Records[0].Key == key {
			t.Fatalf("notification for a part: %s", n.Records[0].EventName)
		}
	}

	info, err := core.CompleteMultipartUpload(ctx, "uploads", key, id, parts, minio.PutObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	c := awaitConverted(t, res, key)
	want, _ := localRaw(t, path, "qcow2")
	if c.SHA256 != want || c.InputSize != int64(len(body)) {
		t.Errorf("converted %+v, want sha256 %s of %d input bytes", c, want, len(body))
	}
	if got := settledJobs(t) - before; got != 1 {
		t.Errorf("completing the upload made %d jobs, want 1", got)
	}
	if !strings.HasSuffix(info.ETag, "-2") {
		t.Errorf("ETag %q is not a two-part upload's", info.ETag)
	}
}

func TestOverwrittenKeyIsConvertedAgain(t *testing.T) {
	res := subscribeResults(t)
	key := "e2e/intake/overwrite/disk.qcow2"
	v1, v2 := smallQcow2(t, "v1.qcow2", 0x74), smallQcow2(t, "v2.qcow2", 0x75)
	upload(t, key, v1, false)
	first := awaitConverted(t, res, key)
	upload(t, key, v2, false)
	second := awaitConverted(t, res, key)
	want, _ := localRaw(t, v2, "qcow2")
	if second.JobID == first.JobID || second.SHA256 != want || second.SHA256 == first.SHA256 || second.DuplicateOf != "" {
		t.Errorf("second conversion %+v; want a new job with the new content's sha256 %s", second, want)
	}
	if got, _ := downloadSum(t, "images", key+".raw"); got != want {
		t.Errorf("stored output %s, want the new content's %s", got, want)
	}
}

func TestSameContentUnderTwoNamesIsConvertedOnce(t *testing.T) {
	res := subscribeResults(t)
	// Content of its own: an earlier run's conversion would answer for
	// the first name too.
	path := runImage(t, "disk.qcow2", 0x76)
	dir := runPrefix("e2e/intake/twice/")
	a, b := dir+"first.qcow2", dir+"second name.qcow2"
	upload(t, a, path, false)
	ca := awaitConverted(t, res, a)
	upload(t, b, path, false)
	cb := awaitConverted(t, res, b)

	want, _ := localRaw(t, path, "qcow2")
	if ca.DuplicateOf != "" || ca.SHA256 != want {
		t.Errorf("first %+v, want a conversion with sha256 %s", ca, want)
	}
	if cb.DuplicateOf != "images/"+a+".raw" || cb.OutputKey != b+".raw" || cb.SHA256 != want || cb.JobID == ca.JobID {
		t.Errorf("second %+v, want a copy of images/%s.raw at %s.raw", cb, a, b)
	}
	for _, k := range []string{a, b} {
		if got, _ := downloadSum(t, "images", k+".raw"); got != want {
			t.Errorf("output of %s has sha256 %s, want %s", k, got, want)
		}
	}
	if st := statusOf(t, "uploads", b); st.State != events.StateDuplicate || st.OutputKey != b+".raw" {
		t.Errorf("status of the second %+v, want DUPLICATE with its own output", st)
	}
}

func TestReconvertQueuesAFreshJobThatBypassesDeduplication(t *testing.T) {
	res := subscribeResults(t)
	path := smallQcow2(t, "disk.qcow2", 0x77)
	key := "e2e/intake/reconvert/disk.qcow2"
	upload(t, key, path, false)
	first := awaitConverted(t, res, key)

	code, stdout, stderr := cli(t, "reconvert", "uploads/"+key, "--format", "qcow2")
	if code != 0 {
		t.Fatalf("reconvert exited %d: %s", code, stderr)
	}
	jobID := strings.TrimSpace(stdout)
	c := awaitConverted(t, res, key)
	if c.JobID != jobID || jobID == first.JobID {
		t.Errorf("result of job %s, reconvert printed %q (first job %s)", c.JobID, jobID, first.JobID)
	}
	// The same content converted before to raw; qcow2 is converted for real.
	if c.OutputFormat != "qcow2" || c.OutputKey != key+".qcow2" || c.DuplicateOf != "" {
		t.Errorf("result %+v, want a qcow2 conversion at %s.qcow2", c, key)
	}
	if !objectExists(t, "images", key+".qcow2") {
		t.Error("no qcow2 output")
	}
	// Again, raw: the content has a raw output already, and still it is
	// converted, not copied.
	code, stdout, stderr = cli(t, "reconvert", "uploads/"+key)
	if code != 0 {
		t.Fatalf("reconvert exited %d: %s", code, stderr)
	}
	again := awaitConverted(t, res, key)
	if again.JobID != strings.TrimSpace(stdout) || again.DuplicateOf != "" || again.SHA256 != first.SHA256 {
		t.Errorf("raw re-convert %+v, want a conversion giving %s", again, first.SHA256)
	}

	for _, tc := range []struct {
		args []string
		want string
		code int // a bad flag value is a usage error, refused before connecting
	}{
		{[]string{"reconvert", "uploads/e2e/intake/reconvert/missing.qcow2"}, "no object uploads/e2e/intake/reconvert/missing.qcow2 exists", 1},
		{[]string{"reconvert", "images/" + key + ".raw"}, `"images" is not the input bucket`, 1},
		{[]string{"reconvert", "--format", "vmdk", "uploads/" + key}, "not raw or qcow2", 2},
	} {
		code, stdout, stderr := cli(t, tc.args...)
		if code != tc.code || stdout != "" || !strings.Contains(stderr, tc.want) || strings.Count(stderr, "\n") != 1 {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want exit %d and one line saying %q", tc.args, code, stdout, stderr, tc.code, tc.want)
		}
	}

	// The same request over NATS, as a program would send it.
	msg, err := e2e.nc.Request(events.SubjectReconvert, []byte(`{"bucket":"uploads","key":"e2e/intake/reconvert/missing.qcow2"}`), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var reply map[string]string
	if err := json.Unmarshal(msg.Data, &reply); err != nil || !strings.Contains(reply["error"], "no object") || reply["job_id"] != "" {
		t.Errorf("reply %s, want {\"error\": ...}", msg.Data)
	}
}

func TestReconcilePicksUpAnUploadWhoseNotificationWasLostExactlyOnce(t *testing.T) {
	res := subscribeResults(t)
	ctx := context.Background()
	prefix := runPrefix("e2e/intake/reconcile/")
	key := prefix + "lost.qcow2"
	v1, v2 := smallQcow2(t, "v1.qcow2", 0x78), smallQcow2(t, "v2.qcow2", 0x79)

	notes := watchNotifications(t)
	restore := func() {
		if err := setup.Notification(ctx, e2e.s3, "uploads", minioserver.TargetID); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(restore)
	// The notification is lost: MinIO never sends it.
	uploadUnnotified := func(path string) {
		t.Helper()
		if err := e2e.s3.RemoveAllBucketNotification(ctx, "uploads"); err != nil {
			t.Fatal(err)
		}
		upload(t, key, path, false)
		// Restoring the configuration must not bring the event back
		// either: a marker upload after the restore is notified, and
		// nothing for the lost key came before it.
		restore()
		marker := "e2e/intake/reconcile-marker.txt"
		putBody(t, marker, []byte("after the restore"), nil)
		for seen := false; !seen; {
			select {
			case m := <-notes.ch:
				n, err := events.ParseNotification(m.Data)
				if err != nil {
					continue
				}
				if n.Records[0].Key == key {
					t.Fatal("MinIO notified although the bucket notification was removed")
				}
				seen = n.Records[0].Key == marker
			case <-time.After(scaled(20 * time.Second)):
				t.Fatal("no notification after the bucket notification was restored")
			}
		}
	}

	uploadUnnotified(v1)
	if hasStatus(t, "uploads", key) {
		t.Fatal("status record without a notification")
	}
	before := settledJobs(t)

	code, stdout, stderr := cli(t, "reconcile", "--prefix", prefix)
	if code != 0 || !strings.HasPrefix(stdout, "listed 1, queued 1, refused 0\n") || !strings.Contains(stdout, key) {
		t.Fatalf("reconcile: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	c := awaitConverted(t, res, key)
	want, _ := localRaw(t, v1, "qcow2")
	if c.SHA256 != want {
		t.Errorf("converted %s, want %s", c.SHA256, want)
	}
	// The job is the one the notification would have made.
	info, err := e2e.s3.StatObject(ctx, "uploads", key, minio.StatObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if wantJob := events.JobIDFor(events.ObjectIdentity("uploads", key, "", info.ETag)); c.JobID != wantJob {
		t.Errorf("job %s, want the notification path's %s", c.JobID, wantJob)
	}

	code, stdout, _ = cli(t, "reconcile", "--prefix", prefix)
	if code != 0 || !strings.HasPrefix(stdout, "listed 1, queued 0, refused 0\n") {
		t.Errorf("second reconcile: exit %d, %q; want nothing queued", code, stdout)
	}
	if got := settledJobs(t) - before; got != 1 {
		t.Errorf("%d jobs, want 1", got)
	}

	// An overwrite whose notification is lost is found too: the record is
	// of the old content and older than the object.
	uploadUnnotified(v2)
	code, stdout, stderr = cli(t, "reconcile", "--prefix", prefix)
	if code != 0 || !strings.HasPrefix(stdout, "listed 1, queued 1, refused 0\n") {
		t.Fatalf("reconcile after overwrite: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	c2 := awaitConverted(t, res, key)
	want2, _ := localRaw(t, v2, "qcow2")
	if c2.SHA256 != want2 || c2.JobID == c.JobID {
		t.Errorf("after overwrite: %+v, want a new job giving %s", c2, want2)
	}
	if got := settledJobs(t) - before; got != 2 {
		t.Errorf("%d jobs in all, want 2", got)
	}
	select {
	case m := <-res.ch:
		if ev, err := events.Decode(m.Data); err == nil && ev.Subject == key {
			t.Errorf("a further result for %s: %s", key, ev.Data)
		}
	case <-time.After(stack.Scaled(500 * time.Millisecond)):
	}
}

func TestImportStreamsAURLIntoTheInputBucketAndConvertsIt(t *testing.T) {
	res := subscribeResults(t)
	path := smallQcow2(t, "served.qcow2", 0x7a)
	body, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	sum := fileSum(t, path)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("chunked") == "" {
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
			w.Write(body)
			return
		}
		// No length: the importer must stream with a part size.
		for b := body; len(b) > 0; b = b[min(len(b), 64<<10):] {
			w.Write(b[:min(len(b), 64<<10)])
			w.(http.Flusher).Flush()
		}
	}))
	defer srv.Close()

	dir := runPrefix("e2e/intake/import/")
	t.Run("known length", func(t *testing.T) {
		key := dir + "disk.qcow2"
		code, stdout, stderr := cli(t, "import", srv.URL+"/files/disk.qcow2", "uploads/"+key, "--sha256", sum)
		if code != 0 || strings.TrimSpace(stdout) != "uploads/"+key {
			t.Fatalf("import: exit %d, stdout %q, stderr %q", code, stdout, stderr)
		}
		c := awaitConverted(t, res, key)
		want, _ := localRaw(t, path, "qcow2")
		if c.SHA256 != want {
			t.Errorf("converted %s, want %s", c.SHA256, want)
		}
		if got, n := downloadSum(t, "uploads", key); got != sum || n != int64(len(body)) {
			t.Errorf("imported object sha256 %s (%d bytes), served %s (%d)", got, n, sum, len(body))
		}
	})
	t.Run("unknown length, default key", func(t *testing.T) {
		// The default key is the URL's file name: one of this run's own.
		name := fmt.Sprintf("chunked-%d.qcow2", time.Now().UnixNano())
		code, stdout, stderr := cli(t, "import", srv.URL+"/files/"+name+"?chunked=1")
		key := ingest.ImportPrefix + name
		if code != 0 || strings.TrimSpace(stdout) != "uploads/"+key {
			t.Fatalf("import: exit %d, stdout %q, stderr %q", code, stdout, stderr)
		}
		c := awaitConverted(t, res, key)
		if got, _ := downloadSum(t, "uploads", key); got != sum || c.InputSize != int64(len(body)) {
			t.Errorf("imported object sha256 %s, input size %d; served %s (%d bytes)", got, c.InputSize, sum, len(body))
		}
	})
	t.Run("wrong digest", func(t *testing.T) {
		before := settledJobs(t)
		key := dir + "tampered.qcow2"
		wrong := strings.Repeat("0", 64)
		code, _, stderr := cli(t, "import", srv.URL+"/files/disk.qcow2", "uploads/"+key, "--sha256", wrong)
		if code != 0 {
			t.Fatalf("import: exit %d, %s", code, stderr)
		}
		f := awaitFailure(t, res, key)
		if f.Rule != events.RuleSHA256Mismatch || f.Phase != events.PhaseIntake || !strings.Contains(f.Message, sum) {
			t.Errorf("failure %+v, want rule sha256-mismatch naming the real digest", f)
		}
		if objectExists(t, "uploads", key) {
			t.Error("the tampered download was stored")
		}
		if got := settledJobs(t) - before; got != 0 {
			t.Errorf("%d jobs, want none", got)
		}
	})
	t.Run("refused before anything starts", func(t *testing.T) {
		for _, tc := range []struct {
			args []string
			want string
		}{
			{[]string{"import", srv.URL + "/files/disk.qcow2", "images/x.qcow2"}, `"images" is not the input bucket`},
			{[]string{"import", "file:///etc/passwd", "uploads/x.qcow2"}, "only http and https"},
			{[]string{"import", srv.URL + "/files/notes.txt"}, "would not be converted"},
		} {
			code, _, stderr := cli(t, tc.args...)
			if code != 1 || !strings.Contains(stderr, tc.want) || strings.Count(stderr, "\n") != 1 {
				t.Errorf("%v: exit %d, stderr %q; want exit 1 and one line saying %q", tc.args, code, stderr, tc.want)
			}
		}
	})
}

func TestBadNotificationsAreCountedAcknowledgedAndMakeNoJob(t *testing.T) {
	ctx := context.Background()
	before, statsBefore := settledJobs(t), intakeStats(t)
	infoBefore := ingestConsumer(ctx, t)
	full := forgedNotification("s3:ObjectCreated:Put", "uploads", "e2e/intake/bad/a.qcow2", 100)
	for _, p := range [][]byte{
		full[:len(full)/2], // truncated
		[]byte(`{"Records":[{"eventName":"s3:ObjectCreated:Put","s3":{"bucket":{"name":"uploads"},"object":{"key":"bad%zzkey.qcow2","size":3}}}]}`),
		forgedNotification("ObjectCreated:Put", "uploads", "e2e/intake/bad/b.qcow2", 100),
		forgedNotification("s3:ObjectCreated:Put", "somebody-elses-bucket", "e2e/intake/bad/c.qcow2", 100),
	} {
		publishRaw(t, p)
	}
	if got := settledJobs(t) - before; got != 0 {
		t.Errorf("%d jobs, want none", got)
	}
	want := map[string]uint64{ingest.ReasonMalformed: 2, ingest.ReasonUnknownEvent: 1, ingest.ReasonOtherBucket: 1}
	if d := awaitStats(t, statsBefore, func(d map[string]uint64) bool { return fmt.Sprint(d) == fmt.Sprint(want) }); fmt.Sprint(d) != fmt.Sprint(want) {
		t.Errorf("counters moved by %v, want %v", d, want)
	}
	infoAfter := ingestConsumer(ctx, t)
	if infoAfter.NumRedelivered != infoBefore.NumRedelivered {
		t.Errorf("bad notifications were redelivered %d times", infoAfter.NumRedelivered-infoBefore.NumRedelivered)
	}
}

func TestDedupPruneRemovesOnlyRecordsOlderThanTheAge(t *testing.T) {
	ctx := context.Background()
	store, err := dedup.Open(ctx, e2e.js, e2e.stack.s.Convert.Dedup.MaxAge.Duration())
	if err != nil {
		t.Fatal(err)
	}
	old, recent := dedup.ContentKey("e2e-prune-old", 1), dedup.ContentKey("e2e-prune-recent", 1)
	for key, age := range map[string]time.Duration{old: 40 * 24 * time.Hour, recent: 20 * 24 * time.Hour} {
		r := dedup.Record{OutputBucket: "images", OutputKey: key + ".raw", CreatedAt: time.Now().Add(-age)}
		if err := store.Put(ctx, key, "raw", r); err != nil {
			t.Fatal(err)
		}
	}
	code, stdout, stderr := cli(t, "dedup", "prune", "--older-than", "30d")
	if code != 0 || !strings.HasSuffix(stdout, "records older than 30d\n") {
		t.Fatalf("dedup prune: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	if _, found, _ := store.Lookup(ctx, old, "raw"); found {
		t.Error("the 40-day-old record survived --older-than 30d")
	}
	if _, found, _ := store.Lookup(ctx, recent, "raw"); !found {
		t.Error("the 20-day-old record was pruned")
	}
	if code, _, stderr := cli(t, "dedup", "prune", "--older-than", "soon"); code != 2 || !strings.Contains(stderr, "want whole days") || strings.Count(stderr, "\n") != 1 {
		t.Errorf("bad age: exit %d, %q", code, stderr)
	}
}

// acquireWithin takes l, trying until within has passed; failing, the
// test ends saying why.
func acquireWithin(ctx context.Context, t *testing.T, l *kvLease, within time.Duration, why string) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		ok, err := l.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(why)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestReconcileLeaseGoesToOneReplicaPerPeriod(t *testing.T) {
	ctx := context.Background()
	every := e2e.stack.s.Ingest.ReconcileEvery
	if every <= 0 {
		every = 10 * time.Minute
	}
	// Leave the stack's lease bucket as its ingest configured it.
	t.Cleanup(func() {
		if _, err := openReconcileLease(ctx, e2e.js, every, 1); err != nil {
			t.Error(err)
		}
	})
	a, err := openReconcileLease(ctx, e2e.js, time.Second, 1)
	if err != nil {
		t.Fatal(err)
	}
	b, err := openReconcileLease(ctx, e2e.js, time.Second, 1)
	if err != nil {
		t.Fatal(err)
	}
	// Whatever a previous period left must expire first.
	acquireWithin(ctx, t, a, scaled(5*time.Second), "lease never free")
	for _, l := range []*kvLease{b, a} {
		if ok, err := l.Acquire(ctx); ok || err != nil {
			t.Errorf("second acquire in the same period = %v, %v", ok, err)
		}
	}
	// The next period is anyone's, once.
	acquireWithin(ctx, t, b, scaled(5*time.Second), "lease not free after its period")
	if ok, _ := a.Acquire(ctx); ok {
		t.Error("two replicas hold the lease")
	}
}
