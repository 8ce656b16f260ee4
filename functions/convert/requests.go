package convert

import (
	"context"
	"io"
	"log/slog"
	"slices"
	"sync"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/dedup"
	"github.com/imagepipe/imagepipe/internal/objstore"
)

// A job's fixed cost is the requests it makes whatever the image's size:
// looks at objects, tags, status writes, publishes. Each job counts its
// own, by kind, and logs them once when it ends, so that the cost of a
// small image can be read off one line. What is counted is convert's own
// calls: an upload or a copy counts once however many parts it sends.

// Kinds of request, as the debug line names them.
const (
	reqStat     = "s3_stat"     // HEAD of an object
	reqGet      = "s3_get"      // GET of an object, whole or a range
	reqPut      = "s3_put"      // an upload of an output or a report
	reqCopy     = "s3_copy"     // a server-side copy
	reqTag      = "s3_tag"      // tags written
	reqTagRead  = "s3_tag_read" // tags read
	reqKVGet    = "kv_get"      // status or de-duplication record read
	reqKVPut    = "kv_put"      // status or de-duplication record written
	reqKVDelete = "kv_delete"   // de-duplication record removed
	reqPublish  = "publish"     // progress and result events
)

// requests counts one job's requests by kind.
type requests struct {
	mu sync.Mutex
	n  map[string]int
}

func (r *requests) add(kind string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.n == nil {
		r.n = map[string]int{}
	}
	r.n[kind]++
}

// count is the number of requests of kind made so far.
func (r *requests) count(kind string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n[kind]
}

// log writes the counts in one debug line.
func (r *requests) log(log *slog.Logger) {
	r.mu.Lock()
	kinds := make([]string, 0, len(r.n))
	for k := range r.n {
		kinds = append(kinds, k)
	}
	slices.Sort(kinds)
	attrs := make([]any, 0, len(kinds))
	for _, k := range kinds {
		attrs = append(attrs, slog.Int(k, r.n[k]))
	}
	r.mu.Unlock()
	log.Debug("requests", slog.Group("requests", attrs...))
}

// countedStore is a job's view of object storage: every call counted.
type countedStore struct {
	Storage
	n *requests
}

func (s countedStore) Open(ctx context.Context, bucket, key, versionID, etag string) (io.ReadCloser, objstore.Object, error) {
	s.n.add(reqGet)
	return s.Storage.Open(ctx, bucket, key, versionID, etag)
}

func (s countedStore) Upload(ctx context.Context, bucket, key string, f objstore.File, meta map[string]string, progress io.Reader, guard objstore.Guard) (objstore.Object, error) {
	s.n.add(reqPut)
	return s.Storage.Upload(ctx, bucket, key, f, meta, progress, guard)
}

func (s countedStore) UploadGrowing(ctx context.Context, bucket, key string, src objstore.Growing, size int64, meta map[string]string, progress io.Reader, guard objstore.Guard) (objstore.Object, error) {
	s.n.add(reqPut)
	return s.Storage.UploadGrowing(ctx, bucket, key, src, size, meta, progress, guard)
}

func (s countedStore) Stat(ctx context.Context, bucket, key string) (objstore.Object, error) {
	s.n.add(reqStat)
	return s.Storage.Stat(ctx, bucket, key)
}

func (s countedStore) ReaderAt(ctx context.Context, bucket, key, versionID string) (objstore.RangeReader, error) {
	ra, err := s.Storage.ReaderAt(ctx, bucket, key, versionID)
	if err != nil {
		return nil, err
	}
	return countedRanges{ra, s.n}, nil
}

func (s countedStore) Copy(ctx context.Context, srcBucket, srcKey, srcVersion, srcETag, dstBucket, dstKey string, meta, tags map[string]string, guard objstore.Guard) (objstore.Object, error) {
	s.n.add(reqCopy)
	return s.Storage.Copy(ctx, srcBucket, srcKey, srcVersion, srcETag, dstBucket, dstKey, meta, tags, guard)
}

func (s countedStore) SetTags(ctx context.Context, bucket, key, versionID string, tags map[string]string) error {
	s.n.add(reqTag)
	return s.Storage.SetTags(ctx, bucket, key, versionID, tags)
}

func (s countedStore) Tags(ctx context.Context, bucket, key string) (map[string]string, error) {
	s.n.add(reqTagRead)
	return s.Storage.Tags(ctx, bucket, key)
}

func (s countedStore) PutBytes(ctx context.Context, bucket, key string, body []byte, contentType string, meta map[string]string) error {
	s.n.add(reqPut)
	return s.Storage.PutBytes(ctx, bucket, key, body, contentType, meta)
}

// countedRanges counts each ranged read: each is a request of its own.
type countedRanges struct {
	objstore.RangeReader
	n *requests
}

func (r countedRanges) ReadAt(p []byte, off int64) (int, error) {
	r.n.add(reqGet)
	return r.RangeReader.ReadAt(p, off)
}

// countedReporter is a job's view of the status record.
type countedReporter struct {
	Reporter
	n *requests
}

func (r countedReporter) Get(ctx context.Context, bucket, key string) (events.Status, error) {
	r.n.add(reqKVGet)
	return r.Reporter.Get(ctx, bucket, key)
}

func (r countedReporter) Set(ctx context.Context, st events.Status) error {
	r.n.add(reqKVPut)
	return r.Reporter.Set(ctx, st)
}

func (r countedReporter) Progress(p events.Progress) error {
	r.n.add(reqPublish)
	return r.Reporter.Progress(p)
}

// countedDeduper is a job's view of the de-duplication records.
type countedDeduper struct {
	Deduper
	n *requests
}

func (d countedDeduper) Lookup(ctx context.Context, contentKey, format string) (dedup.Record, bool, error) {
	d.n.add(reqKVGet)
	return d.Deduper.Lookup(ctx, contentKey, format)
}

func (d countedDeduper) Put(ctx context.Context, contentKey, format string, r dedup.Record) error {
	d.n.add(reqKVPut)
	return d.Deduper.Put(ctx, contentKey, format, r)
}

func (d countedDeduper) Forget(ctx context.Context, contentKey, format string) error {
	d.n.add(reqKVDelete)
	return d.Deduper.Forget(ctx, contentKey, format)
}
