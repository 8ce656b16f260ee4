package ingest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"iter"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/status"
)

// fakeStatus keeps records in a map, as the key-value bucket would.
type fakeStatus struct {
	mu      sync.Mutex
	records map[string]events.Status
	queued  []events.Status
	QueueFn func(ctx context.Context, st events.Status) error // optional failure injection
}

var _ StatusStore = (*fakeStatus)(nil)

func newFakeStatus() *fakeStatus { return &fakeStatus{records: map[string]events.Status{}} }

func (f *fakeStatus) Queue(ctx context.Context, st events.Status) error {
	if f.QueueFn != nil {
		if err := f.QueueFn(ctx, st); err != nil {
			return err
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if cur, ok := f.records[st.Bucket+"/"+st.Key]; ok && cur.JobID == st.JobID && cur.State != events.StateQueued {
		return nil
	}
	st.State = events.StateQueued
	f.records[st.Bucket+"/"+st.Key] = st
	f.queued = append(f.queued, st)
	return nil
}

func (f *fakeStatus) Set(_ context.Context, st events.Status) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.records[st.Bucket+"/"+st.Key] = st
	return nil
}

func (f *fakeStatus) Get(_ context.Context, bucket, key string) (events.Status, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	st, ok := f.records[bucket+"/"+key]
	if !ok {
		return events.Status{}, fmt.Errorf("%s/%s: %w", bucket, key, status.ErrNotFound)
	}
	return st, nil
}

func (f *fakeStatus) record(bucket, key string) (events.Status, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	st, ok := f.records[bucket+"/"+key]
	return st, ok
}

// fakeStorage is a bucket in memory.
type fakeStorage struct {
	mu      sync.Mutex
	objects map[string]objstore.Object // by bucket/key
	bodies  map[string][]byte
	tags    map[string]map[string]string // by bucket/key
	stats   int
}

var _ Storage = (*fakeStorage)(nil)

func newFakeStorage(objs ...objstore.Object) *fakeStorage {
	f := &fakeStorage{objects: map[string]objstore.Object{}, bodies: map[string][]byte{}}
	for _, o := range objs {
		f.objects[o.Bucket+"/"+o.Key] = o
	}
	return f
}

func notFound(bucket, key string) error {
	return fmt.Errorf("stat %s/%s: %w", bucket, key, minio.ErrorResponse{Code: minio.NoSuchKey, StatusCode: 404})
}

func (f *fakeStorage) Stat(_ context.Context, bucket, key string) (objstore.Object, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.stats++
	o, ok := f.objects[bucket+"/"+key]
	if !ok {
		return objstore.Object{}, notFound(bucket, key)
	}
	return o, nil
}

func (f *fakeStorage) List(_ context.Context, bucket, prefix string) iter.Seq2[objstore.Object, error] {
	f.mu.Lock()
	var objs []objstore.Object
	for _, o := range f.objects {
		if o.Bucket == bucket && len(o.Key) >= len(prefix) && o.Key[:len(prefix)] == prefix {
			objs = append(objs, o)
		}
	}
	f.mu.Unlock()
	sort.Slice(objs, func(i, j int) bool { return objs[i].Key < objs[j].Key })
	return func(yield func(objstore.Object, error) bool) {
		for _, o := range objs {
			if !yield(o, nil) {
				return
			}
		}
	}
}

func (f *fakeStorage) PutStream(_ context.Context, bucket, key string, r io.Reader, size int64, partSize uint64, meta map[string]string, ifAbsent bool) error {
	if size < 0 && partSize == 0 {
		return fmt.Errorf("unknown size needs a part size")
	}
	body, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	if size >= 0 && int64(len(body)) != size {
		return fmt.Errorf("got %d of %d bytes", len(body), size)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.objects[bucket+"/"+key] = objstore.Object{Bucket: bucket, Key: key, Size: int64(len(body)), ETag: "e-import", Metadata: meta, LastModified: time.Now()}
	f.bodies[bucket+"/"+key] = bytes.Clone(body)
	return nil
}

func (f *fakeStorage) Tags(_ context.Context, bucket, key string) (map[string]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.objects[bucket+"/"+key]; !ok {
		return nil, notFound(bucket, key)
	}
	return f.tags[bucket+"/"+key], nil
}

func (f *fakeStorage) has(bucket, key string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.objects[bucket+"/"+key]
	return ok
}

// fakeJobs is the job queue: the job ids it holds, and what was requeued.
type fakeJobs struct {
	mu       sync.Mutex
	held     map[string]bool
	seenIDs  map[string]bool // event ids within the duplicate window
	requeued []events.Message
}

var _ JobQueue = (*fakeJobs)(nil)

func (f *fakeJobs) JobIDs(context.Context) (map[string]bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := map[string]bool{}
	for id, held := range f.held {
		if held {
			out[id] = true
		}
	}
	return out, nil
}

func (f *fakeJobs) Requeue(_ context.Context, m events.Message) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.seenIDs[m.Event.ID] {
		return true, nil
	}
	f.requeued = append(f.requeued, m)
	return false, nil
}

// published records what a Publisher was given.
type published struct {
	mu   sync.Mutex
	msgs []events.Message
	err  error
}

func (p *published) publish(_ context.Context, msgs ...events.Message) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.err != nil {
		return p.err
	}
	p.msgs = append(p.msgs, msgs...)
	return nil
}

func (p *published) all() []events.Message {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]events.Message(nil), p.msgs...)
}

var testNow = time.Date(2026, 11, 23, 8, 0, 0, 0, time.UTC)

type testRig struct {
	h       *Handler
	status  *fakeStatus
	storage *fakeStorage
	pub     *published
}

func newRig(cfg Config, objs ...objstore.Object) *testRig {
	if cfg.InputBucket == "" {
		cfg.InputBucket, cfg.OutputBucket = "uploads", "images"
	}
	r := &testRig{status: newFakeStatus(), storage: newFakeStorage(objs...), pub: &published{}}
	r.h = New(cfg, Deps{Status: r.status, Storage: r.storage, Publish: r.pub.publish}, slog.New(slog.DiscardHandler))
	r.h.now = func() time.Time { return testNow }
	return r
}

func decodeJob(t interface {
	Helper()
	Fatal(...any)
}, m events.Message) events.ConvertJob {
	t.Helper()
	var job events.ConvertJob
	if err := m.Event.DecodeData(events.TypeConvertJob, &job); err != nil {
		t.Fatal(err)
	}
	return job
}

func decodeFailed(t interface {
	Helper()
	Fatal(...any)
}, m events.Message) events.Failed {
	t.Helper()
	var f events.Failed
	if err := m.Event.DecodeData(events.TypeFailed, &f); err != nil {
		t.Fatal(err)
	}
	return f
}
