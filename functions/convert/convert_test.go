package convert

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
	"github.com/imagepipe/imagepipe/internal/scratch"
)

// Unit tests drive the handler with small fakes; the real stack is tested
// end to end in cmd/imagepipe.

type fakeStore struct {
	OpenFn     func(ctx context.Context, bucket, key, versionID, etag string) (io.ReadCloser, objstore.Object, error)
	UploadFn   func(ctx context.Context, bucket, key string, f objstore.File, meta map[string]string, progress io.Reader) (objstore.Object, error)
	GrowingFn  func(ctx context.Context, bucket, key string, src objstore.Growing, size int64, meta map[string]string, progress io.Reader) (objstore.Object, error)
	StatFn     func(ctx context.Context, bucket, key string) (objstore.Object, error)
	PutBytesFn func(ctx context.Context, bucket, key string, body []byte, contentType string, meta map[string]string) error
	ReaderAtFn func(ctx context.Context, bucket, key, versionID string) (objstore.RangeReader, error)
	CopyFn     func(ctx context.Context, srcBucket, srcKey, srcVersion, srcETag, dstBucket, dstKey string, meta, tags map[string]string) (objstore.Object, error)
	SetTagsFn  func(ctx context.Context, bucket, key, versionID string, tags map[string]string) error
	TagsFn     func(ctx context.Context, bucket, key string) (map[string]string, error)
	AbortFn    func(ctx context.Context, bucket, key, uploadID string) error
	PendingFn  func(ctx context.Context, bucket, key string) ([]objstore.Pending, error)

	mu      sync.Mutex
	written map[string]objstore.Object // outputs written, which Stat finds
}

// wrote finishes a write as the real store does: its guard runs last and
// may veto it, and the object is then there for Stat to find.
func (f *fakeStore) wrote(ctx context.Context, b, k string, meta map[string]string, guard objstore.Guard, obj objstore.Object, err error) (objstore.Object, error) {
	if err != nil {
		return obj, err
	}
	if guard.Started != nil {
		guard.Started("upload-of-" + k)
	}
	if guard.Check != nil {
		if err := guard.Check(ctx); err != nil {
			return objstore.Object{}, err
		}
	}
	obj.Bucket, obj.Key, obj.Metadata = b, k, meta
	if obj.ETag == "" {
		obj.ETag = "etag-of-" + meta[events.MetaJob]
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.written == nil {
		f.written = map[string]objstore.Object{}
	}
	f.written[b+"/"+k] = obj
	return obj, nil
}

var _ Storage = (*fakeStore)(nil)

func (f *fakeStore) Pending(ctx context.Context, b, k string) ([]objstore.Pending, error) {
	if f.PendingFn == nil {
		return nil, nil
	}
	return f.PendingFn(ctx, b, k)
}

func (f *fakeStore) Abort(ctx context.Context, b, k, id string) error {
	if f.AbortFn == nil {
		return nil
	}
	return f.AbortFn(ctx, b, k, id)
}

func (f *fakeStore) Open(ctx context.Context, b, k, v, e string) (io.ReadCloser, objstore.Object, error) {
	return f.OpenFn(ctx, b, k, v, e)
}
func (f *fakeStore) Upload(ctx context.Context, b, k string, file objstore.File, m map[string]string, pr io.Reader, g objstore.Guard) (objstore.Object, error) {
	obj, err := f.UploadFn(ctx, b, k, file, m, pr)
	return f.wrote(ctx, b, k, m, g, obj, err)
}
func (f *fakeStore) UploadGrowing(ctx context.Context, b, k string, src objstore.Growing, size int64, m map[string]string, pr io.Reader, g objstore.Guard) (objstore.Object, error) {
	obj, err := f.GrowingFn(ctx, b, k, src, size, m, pr)
	return f.wrote(ctx, b, k, m, g, obj, err)
}
func (f *fakeStore) Stat(ctx context.Context, b, k string) (objstore.Object, error) {
	f.mu.Lock()
	obj, ok := f.written[b+"/"+k]
	f.mu.Unlock()
	if ok {
		return obj, nil
	}
	return f.StatFn(ctx, b, k)
}
func (f *fakeStore) PutBytes(ctx context.Context, b, k string, body []byte, ct string, m map[string]string) error {
	return f.PutBytesFn(ctx, b, k, body, ct, m)
}
func (f *fakeStore) ReaderAt(ctx context.Context, b, k, v string) (objstore.RangeReader, error) {
	return f.ReaderAtFn(ctx, b, k, v)
}
func (f *fakeStore) Copy(ctx context.Context, sb, sk, sv, se, db, dk string, m, t map[string]string, g objstore.Guard) (objstore.Object, error) {
	obj, err := f.CopyFn(ctx, sb, sk, sv, se, db, dk, m, t)
	return f.wrote(ctx, db, dk, m, g, obj, err)
}
func (f *fakeStore) SetTags(ctx context.Context, b, k, v string, t map[string]string) error {
	return f.SetTagsFn(ctx, b, k, v, t)
}
func (f *fakeStore) Tags(ctx context.Context, b, k string) (map[string]string, error) {
	return f.TagsFn(ctx, b, k)
}

type fakeReporter struct {
	mu     sync.Mutex
	states []events.Status
}

func (r *fakeReporter) Set(_ context.Context, st events.Status) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.states = append(r.states, st)
	return nil
}
func (r *fakeReporter) Progress(events.Progress) error { return nil }

func (r *fakeReporter) Get(_ context.Context, bucket, key string) (events.Status, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for i := len(r.states) - 1; i >= 0; i-- {
		if r.states[i].Bucket == bucket && r.states[i].Key == key {
			return r.states[i], nil
		}
	}
	return events.Status{}, errors.New("no status record")
}

type bytesAt struct{ *bytes.Reader }

func (bytesAt) Close() error { return nil }

// memStore serves one object from memory and records what is done to it.
func memStore(key string, body []byte, meta map[string]string) (*fakeStore, *[]string) {
	var calls []string
	var mu sync.Mutex
	note := func(s string) { mu.Lock(); calls = append(calls, s); mu.Unlock() }
	obj := objstore.Object{Bucket: "uploads", Key: key, Size: int64(len(body)), ETag: "e1", Metadata: meta}
	return &fakeStore{
		StatFn: func(_ context.Context, b, k string) (objstore.Object, error) {
			if b == "uploads" && k == key {
				return obj, nil
			}
			return objstore.Object{}, errors.New("not found")
		},
		OpenFn: func(context.Context, string, string, string, string) (io.ReadCloser, objstore.Object, error) {
			note("open")
			return io.NopCloser(bytes.NewReader(body)), obj, nil
		},
		ReaderAtFn: func(context.Context, string, string, string) (objstore.RangeReader, error) {
			return bytesAt{bytes.NewReader(body)}, nil
		},
		CopyFn: func(_ context.Context, _, _, _, _, db, dk string, _, t map[string]string) (objstore.Object, error) {
			note("copy " + db + "/" + dk)
			if len(t[events.TagSHA256]) != 64 {
				return objstore.Object{}, errors.New("copy without the output's sha256 tag")
			}
			return objstore.Object{Bucket: db, Key: dk, Size: obj.Size}, nil
		},
		SetTagsFn: func(_ context.Context, b, k, _ string, _ map[string]string) error {
			note("tag " + b + "/" + k)
			return nil
		},
		TagsFn: func(context.Context, string, string) (map[string]string, error) {
			return nil, errors.New("no tags")
		},
		UploadFn: func(_ context.Context, b, k string, _ objstore.File, _ map[string]string, _ io.Reader) (objstore.Object, error) {
			note("upload " + b + "/" + k)
			return objstore.Object{}, nil
		},
		PutBytesFn: func(_ context.Context, b, k string, _ []byte, _ string, _ map[string]string) error {
			note("put " + b + "/" + k)
			return nil
		},
	}, &calls
}

func newTestHandler(t *testing.T, store Storage, rep *fakeReporter) *Handler {
	t.Helper()
	cfg := Config{OutputBucket: "images", OutputFormat: "raw", ScratchDir: t.TempDir(), MaxVirtualSize: 1 << 40,
		ConvertTimeoutBase: time.Minute, ConvertTimeoutPerGiB: time.Minute}
	return New(cfg, store, qemuimg.New(nil), rep, nil, slog.New(slog.DiscardHandler))
}

func TestRawUploadToRawIsCopiedServerSideNotConverted(t *testing.T) {
	body := bytes.Repeat([]byte{0x5a}, 1<<20)
	store, calls := memStore("disks/a.raw", body, nil)
	h := newTestHandler(t, store, &fakeReporter{})
	out, err := h.Handle(context.Background(), events.ConvertJob{JobID: "j", Bucket: "uploads", Key: "disks/a.raw", ETag: "e1", Size: 1 << 20}, 1, 4)
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(*calls, ","); got != "open,copy images/disks/a.raw.raw" {
		t.Errorf("storage calls %q, want one read for the hash and one server-side copy", got)
	}
	// The copy's upload is noted in the job's scratch, never elsewhere.
	if _, err := os.Stat(scratch.UploadsNote); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("an upload note was written outside scratch: %v", err)
	}
	var c events.Converted
	if err := out[0].Event.DecodeData(events.TypeConverted, &c); err != nil {
		t.Fatal(err)
	}
	// sha256 of 1 MiB of 0x5a.
	if c.InputFormat != "raw" || c.VirtualSize != 1<<20 || c.OutputSize != 1<<20 || len(c.SHA256) != 64 {
		t.Errorf("converted = %+v", c)
	}
}

func TestTextUploadNamedVHDXIsRefusedWithoutRetryAndReported(t *testing.T) {
	store, calls := memStore("notes.vhdx", []byte(strings.Repeat("hello\n", 1000)), nil)
	rep := &fakeReporter{}
	h := newTestHandler(t, store, rep)
	out, err := h.Handle(context.Background(), events.ConvertJob{JobID: "j", Bucket: "uploads", Key: "notes.vhdx", ETag: "e1"}, 1, 4)
	if !failure.IsPermanent(err) {
		t.Fatalf("err = %v, want permanent", err)
	}
	var f events.Failed
	if err := out[0].Event.DecodeData(events.TypeFailed, &f); err != nil {
		t.Fatal(err)
	}
	if f.Rule != "extension-mismatch" || f.WillRetry || f.Phase != events.PhaseInspect || f.System == nil || f.System.QemuImgVersion == "" {
		t.Errorf("failed = %+v", f)
	}
	if last := rep.states[len(rep.states)-1]; last.State != events.StateFailed {
		t.Errorf("last state %s, want FAILED", last.State)
	}
	if got := strings.Join(*calls, ","); !strings.Contains(got, "put uploads/errors/notes.vhdx.error.json") || strings.Contains(got, "upload ") {
		t.Errorf("storage calls %q: want an error report and no output", got)
	}
}

func TestTransientFailureSaysItWillRetryAndLeavesTheImageQueued(t *testing.T) {
	store, _ := memStore("a.qcow2", []byte("x"), nil)
	store.OpenFn = func(context.Context, string, string, string, string) (io.ReadCloser, objstore.Object, error) {
		return nil, objstore.Object{}, errors.New("connection refused")
	}
	store.StatFn = func(context.Context, string, string) (objstore.Object, error) {
		return objstore.Object{}, errors.New("connection refused")
	}
	rep := &fakeReporter{}
	h := newTestHandler(t, store, rep)
	out, err := h.Handle(context.Background(), events.ConvertJob{JobID: "j", Bucket: "uploads", Key: "a.qcow2"}, 2, 4)
	if err == nil || failure.IsPermanent(err) {
		t.Fatalf("err = %v, want retryable", err)
	}
	var f events.Failed
	_ = out[0].Event.DecodeData(events.TypeFailed, &f)
	if !f.WillRetry || f.Attempt != 2 || f.Phase != events.PhaseDownload {
		t.Errorf("failed = %+v", f)
	}
	if last := rep.states[len(rep.states)-1]; last.State != events.StateQueued {
		t.Errorf("last state %s, want QUEUED until the next attempt", last.State)
	}
}

func TestScratchDirIsEmptyAfterEveryJob(t *testing.T) {
	store, _ := memStore("notes.vhdx", []byte("not a disk"), nil)
	h := newTestHandler(t, store, &fakeReporter{})
	_, _ = h.Handle(context.Background(), events.ConvertJob{JobID: "j", Bucket: "uploads", Key: "notes.vhdx"}, 1, 4)
	entries, err := os.ReadDir(h.cfg.ScratchDir)
	if err != nil || len(entries) != 0 {
		t.Errorf("scratch holds %v (%v)", entries, err)
	}
}

func TestBackoffDoublesFromTheConfiguredBase(t *testing.T) {
	got := Config{RetryBackoff: 5 * time.Minute, MaxAttempts: 4}.Backoff()
	want := []time.Duration{5 * time.Minute, 10 * time.Minute, 20 * time.Minute}
	if len(got) != len(want) {
		t.Fatalf("Backoff() = %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("Backoff()[%d] = %v, want %v", i, got[i], want[i])
		}
	}
}

func TestCompressedSuffixIsIgnoredForTheExtensionCheck(t *testing.T) {
	for key, want := range map[string]string{
		"a.qcow2.xz": "a.qcow2", "a.vmdk.GZ": "a.vmdk", "a.img.zst": "a.img", "a.img.zstd": "a.img", "a.qcow2": "a.qcow2",
	} {
		codec := map[string]string{"a.qcow2.xz": "xz", "a.vmdk.GZ": "gzip", "a.img.zst": "zstd", "a.img.zstd": "zstd"}[key]
		if got := keyForExtension(key, codec); got != want {
			t.Errorf("keyForExtension(%q) = %q, want %q", key, got, want)
		}
	}
}

func TestJobCancelledWhileQueuedIsSkippedAndReported(t *testing.T) {
	store, calls := memStore("a.qcow2", []byte("x"), nil)
	rep := &fakeReporter{states: []events.Status{{Bucket: "uploads", Key: "a.qcow2", JobID: "j", State: events.StateCancelled}}}
	h := newTestHandler(t, store, rep)
	out, err := h.Handle(context.Background(), events.ConvertJob{JobID: "j", Bucket: "uploads", Key: "a.qcow2"}, 1, 4)
	if !failure.IsPermanent(err) {
		t.Fatalf("err = %v, want permanent", err)
	}
	var f events.Failed
	_ = out[0].Event.DecodeData(events.TypeFailed, &f)
	if f.Rule != events.RuleCancelled || f.WillRetry {
		t.Errorf("failed = %+v, want rule cancelled", f)
	}
	if len(*calls) != 0 {
		t.Errorf("a cancelled job touched storage: %v", *calls)
	}
	if last := rep.states[len(rep.states)-1]; last.State != events.StateCancelled {
		t.Errorf("last state %s, want CANCELLED", last.State)
	}
	// Its term lost, the job comes again: the same event, which
	// JetStream drops as a copy.
	again, err := h.Handle(context.Background(), events.ConvertJob{JobID: "j", Bucket: "uploads", Key: "a.qcow2"}, 2, 4)
	if !failure.IsPermanent(err) || len(again) != 1 || again[0].Event.ID != out[0].Event.ID {
		t.Errorf("delivered again: %+v, %v; want the first delivery's event %s again", again, err, out[0].Event.ID)
	}
}

func TestShutdownMidJobRequeuesWithoutReporting(t *testing.T) {
	store, calls := memStore("a.qcow2", []byte("x"), nil)
	rep := &fakeReporter{}
	h := newTestHandler(t, store, rep)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	out, err := h.Handle(ctx, events.ConvertJob{JobID: "j", Bucket: "uploads", Key: "a.qcow2"}, 4, 4)
	if err == nil || failure.IsPermanent(err) || len(out) != 0 {
		t.Fatalf("Handle = %v, %v; want a retryable error and no event", out, err)
	}
	for _, c := range *calls {
		if strings.HasPrefix(c, "put ") {
			t.Errorf("an interrupted job wrote an error report: %v", *calls)
		}
	}
	if last := rep.states[len(rep.states)-1]; last.State != events.StateQueued {
		t.Errorf("last state %s, want QUEUED", last.State)
	}
}

// liveAndDeadJobDirs makes, in root, the dir of a job still running and
// one whose lock nobody holds, as a killed process leaves.
func liveAndDeadJobDirs(t *testing.T, root string) (live, dead string) {
	t.Helper()
	live, release, err := scratch.NewJobDir(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release)
	dead, err = os.MkdirTemp(root, scratch.JobDirPrefix)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dead, scratch.LockName), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return live, dead
}

func TestJobNoDeliveryFinishedFailsForGoodWithAReport(t *testing.T) {
	store, calls := memStore("disks/a.vhdx", []byte("irrelevant"), nil)
	rep := &fakeReporter{}
	h := newTestHandler(t, store, rep)
	out := h.Exhausted(context.Background(), events.ConvertJob{JobID: "j", Bucket: "uploads", Key: "disks/a.vhdx"}, 8)
	if len(out) != 1 || out[0].Subject != events.SubjectFailed {
		t.Fatalf("events %+v, want one failed event", out)
	}
	var f events.Failed
	if err := out[0].Event.DecodeData(events.TypeFailed, &f); err != nil {
		t.Fatal(err)
	}
	if f.WillRetry || f.Attempt != 8 || !strings.Contains(f.Message, "stopped 8 times") || !strings.Contains(f.Suggestion, "imagepipe reconvert uploads/disks/a.vhdx") {
		t.Errorf("failed = %+v", f)
	}
	if last := rep.states[len(rep.states)-1]; last.State != events.StateFailed {
		t.Errorf("last state %s, want FAILED", last.State)
	}
	if got := strings.Join(*calls, ","); !strings.Contains(got, "put uploads/errors/disks/a.vhdx.error.json") {
		t.Errorf("storage calls %q: want an error report", got)
	}
}

func TestUploadsADeadJobStartedAreAbortedWithItsScratchAndNoOthers(t *testing.T) {
	root := t.TempDir()
	live, dead := liveAndDeadJobDirs(t, root)
	for dir, id := range map[string]string{dead: "dead-upload", live: "live-upload"} {
		if err := scratch.NoteUpload(dir, scratch.NotedUpload{Bucket: "images", Key: "a.vhdx.raw", Since: time.Now()}); err != nil {
			t.Fatal(err)
		}
		if err := scratch.NoteUpload(dir, scratch.NotedUpload{Bucket: "images", Key: "a.vhdx.raw", UploadID: id}); err != nil {
			t.Fatal(err)
		}
	}
	// The dead job was starting a second upload when it died: the server
	// made it, the note of its id never came.
	since := time.Now()
	if err := scratch.NoteUpload(dead, scratch.NotedUpload{Bucket: "images", Key: "b.vhdx.raw", Since: since}); err != nil {
		t.Fatal(err)
	}
	if err := scratch.NoteUpload(live, scratch.NotedUpload{Bucket: "images", Key: "b.vhdx.raw", UploadID: "live-b"}); err != nil {
		t.Fatal(err)
	}
	// A note its writer died in the middle of.
	f, err := os.OpenFile(filepath.Join(dead, scratch.UploadsNote), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(`{"bucket":"images","key":"a.vhd`)
	f.Close()

	var aborted []string
	store := &fakeStore{AbortFn: func(_ context.Context, b, k, id string) error {
		aborted = append(aborted, b+"/"+k+" "+id)
		return nil
	}, PendingFn: func(_ context.Context, b, k string) ([]objstore.Pending, error) {
		if k != "b.vhdx.raw" {
			return nil, nil
		}
		return []objstore.Pending{
			{UploadID: "older-b", Initiated: since.Add(-time.Minute)},
			{UploadID: "live-b", Initiated: since},
			{UploadID: "unnamed-b", Initiated: since.Add(time.Millisecond)},
		}, nil
	}}
	cfg := Config{OutputBucket: "images", OutputFormat: "raw", ScratchDir: root}
	New(cfg, store, qemuimg.New(nil), &fakeReporter{}, nil, slog.New(slog.DiscardHandler)).Sweep(context.Background())

	if want := []string{"images/a.vhdx.raw dead-upload", "images/b.vhdx.raw unnamed-b"}; !slices.Equal(aborted, want) {
		t.Errorf("aborted %q, want only the dead job's uploads %q", aborted, want)
	}
	if _, err := os.Stat(dead); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the dead job's scratch is still there: %v", err)
	}
}

func TestAJobQueuedAgainCountsOnFromItsPriorAttempts(t *testing.T) {
	body := bytes.Repeat([]byte{0x5a}, 1<<20)
	store, _ := memStore("disks/a.raw", body, nil)
	rep := &fakeReporter{}
	h := newTestHandler(t, store, rep)
	job := events.ConvertJob{JobID: "j", Bucket: "uploads", Key: "disks/a.raw", ETag: "e1", Size: 1 << 20, PriorAttempts: 2}
	out, err := h.Handle(context.Background(), job, 1, 4)
	if err != nil || len(out) != 1 {
		t.Fatalf("Handle = %v, %v", out, err)
	}
	var c events.Converted
	if err := out[0].Event.DecodeData(events.TypeConverted, &c); err != nil {
		t.Fatal(err)
	}
	last := rep.states[len(rep.states)-1]
	if c.Attempt != 3 || last.State != events.StateReady || last.Attempt != 3 {
		t.Errorf("attempt %d, last state %s at attempt %d; want attempt 3 (2 before it was queued again, then 1)", c.Attempt, last.State, last.Attempt)
	}
}
