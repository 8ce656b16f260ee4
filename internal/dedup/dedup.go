package dedup

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/setup"
)

// Record says where the conversion of one content to one output format
// already is. Convert writes it after a successful upload and reads it
// before converting.
type Record struct {
	ContentKey   string `json:"content_key"`
	OutputFormat string `json:"output_format"`
	OutputBucket string `json:"output_bucket"`
	OutputKey    string `json:"output_key"`
	// SHA256 and Size describe the output, so a copy of it can be reported
	// without reading it back.
	SHA256 string `json:"sha256"`
	Size   int64  `json:"size"`
	// JobID is the job that made the output.
	JobID string `json:"job_id"`
	// The input the output was made from, and what inspection learnt of
	// it: a duplicate's result event repeats them.
	InputBucket string `json:"input_bucket,omitempty"`
	InputKey    string `json:"input_key,omitempty"`
	InputFormat string `json:"input_format,omitempty"`
	// InputSHA256 is the hex SHA-256 of the input as uploaded, so an
	// upload that declares its checksum is only matched by content that
	// had that checksum.
	InputSHA256 string `json:"input_sha256,omitempty"`
	VirtualSize int64  `json:"virtual_size,omitempty"`
	// CreatedAt is when the record was written; Prune compares it.
	CreatedAt time.Time `json:"created_at"`
}

// Output is the record's output as "bucket/key", the form of
// events.Converted.DuplicateOf.
func (r Record) Output() string { return r.OutputBucket + "/" + r.OutputKey }

// ContentKey identifies content by its S3 ETag and size. An ETag is the MD5
// of the object for a single PUT, and an MD5 of the part MD5s with a part
// count for a multipart upload: the same file uploaded with another part
// size gets another key (a missed duplicate, never a false one). The size
// guards against ETags that are not digests at all.
func ContentKey(etag string, size int64) string {
	var b strings.Builder
	b.WriteString("etag_")
	escape(&b, strings.Trim(etag, `"`))
	b.WriteByte('_')
	b.WriteString(strconv.FormatInt(size, 10))
	return b.String()
}

// ContentKeySHA256 identifies content by the hex SHA-256 of its bytes.
func ContentKeySHA256(hexsum string) string {
	var b strings.Builder
	b.WriteString("sha256_")
	escape(&b, strings.ToLower(hexsum))
	return b.String()
}

// escape keeps [a-zA-Z0-9-] and writes every other byte as =XX, so any
// ETag makes a valid key-value key and two ETags never share one.
func escape(b *strings.Builder, s string) {
	const hexdigits = "0123456789ABCDEF"
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-':
			b.WriteByte(c)
		default:
			b.WriteByte('=')
			b.WriteByte(hexdigits[c>>4])
			b.WriteByte(hexdigits[c&15])
		}
	}
}

// Store reads and writes records.
type Store struct {
	kv jetstream.KeyValue
}

// Option adjusts Open.
type Option func(*jetstream.KeyValueConfig)

// WithReplicas sets how many JetStream replicas keep the bucket (3 in a
// cluster); the default is 1.
func WithReplicas(n int) Option {
	return func(c *jetstream.KeyValueConfig) {
		if n > 0 {
			c.Replicas = n
		}
	}
}

// Open opens the bucket, creating it from BucketConfig if it does not
// exist yet (setup.KV: an existing bucket is used as it is, and `imagepipe
// setup` brings it to the settings), and returns a store on it. Every
// replica calls Open at start; it is idempotent.
func Open(ctx context.Context, js jetstream.JetStream, maxAge time.Duration, opts ...Option) (*Store, error) {
	cfg, err := BucketConfig(maxAge, opts...)
	if err != nil {
		return nil, err
	}
	kv, err := setup.KV(ctx, js, cfg)
	if err != nil {
		return nil, err
	}
	return &Store{kv: kv}, nil
}

// BucketConfig is the bucket as the settings want it. maxAge is how long
// each record lives after it was written: the bucket's TTL is the stream's
// MaxAge, which JetStream applies to each entry from the moment it was
// stored; 0 keeps records until pruned.
func BucketConfig(maxAge time.Duration, opts ...Option) (jetstream.KeyValueConfig, error) {
	if maxAge < 0 {
		return jetstream.KeyValueConfig{}, fmt.Errorf("open %s: negative max age %s", events.DedupBucket, maxAge)
	}
	cfg := jetstream.KeyValueConfig{
		Bucket:      events.DedupBucket,
		Description: "outputs of already converted content, by content and output format",
		History:     1,
		TTL:         maxAge,
		Storage:     jetstream.FileStorage,
		Replicas:    1,
	}
	for _, o := range opts {
		o(&cfg)
	}
	return cfg, nil
}

// Existing returns a store on the bucket as it is, without creating or
// changing it: for tools that must not provision as a side effect. The
// error wraps jetstream.ErrBucketNotFound when there is none.
func Existing(ctx context.Context, js jetstream.JetStream) (*Store, error) {
	kv, err := js.KeyValue(ctx, events.DedupBucket)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", events.DedupBucket, err)
	}
	return &Store{kv: kv}, nil
}

// kvKey is contentKey.format: one record per content and output format,
// since a raw output is no duplicate of a qcow2 one.
func kvKey(contentKey, format string) (string, error) {
	if contentKey == "" {
		return "", errors.New("empty content key")
	}
	if format == "" {
		return "", errors.New("empty output format")
	}
	for _, c := range format {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9') {
			return "", fmt.Errorf("output format %q is not a lower-case word", format)
		}
	}
	return contentKey + "." + format, nil
}

// Lookup returns the record of content already converted to format. found
// is false when there is none. An error means the store could not answer,
// and the caller should convert as if there were no record. The record's
// output may have been deleted since: the caller checks it still exists,
// and converts (then Puts a new record) if not.
func (s *Store) Lookup(ctx context.Context, contentKey, format string) (r Record, found bool, err error) {
	key, err := kvKey(contentKey, format)
	if err != nil {
		return Record{}, false, fmt.Errorf("dedup lookup: %w", err)
	}
	e, err := s.kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return Record{}, false, nil
	}
	if err != nil {
		return Record{}, false, fmt.Errorf("dedup lookup %s: %w", key, err)
	}
	if err := json.Unmarshal(e.Value(), &r); err != nil {
		return Record{}, false, fmt.Errorf("dedup lookup %s: decode record: %w", key, err)
	}
	return r, true, nil
}

// Put records that content was converted to format. It replaces any
// earlier record of the same content and format; ContentKey and
// OutputFormat are set from the arguments and CreatedAt defaults to now.
func (s *Store) Put(ctx context.Context, contentKey, format string, r Record) error {
	key, err := kvKey(contentKey, format)
	if err != nil {
		return fmt.Errorf("dedup put: %w", err)
	}
	if r.OutputBucket == "" || r.OutputKey == "" {
		return fmt.Errorf("dedup put %s: the record names no output", key)
	}
	r.ContentKey, r.OutputFormat = contentKey, format
	if r.CreatedAt.IsZero() {
		r.CreatedAt = time.Now()
	}
	r.CreatedAt = r.CreatedAt.UTC()
	b, err := json.Marshal(r)
	if err != nil {
		return fmt.Errorf("dedup put %s: %w", key, err)
	}
	if _, err := s.kv.Put(ctx, key, b); err != nil {
		return fmt.Errorf("dedup put %s: %w", key, err)
	}
	return nil
}

// Forget removes the record of content converted to format, for instance
// when its output turned out to be gone. A missing record is not an error.
func (s *Store) Forget(ctx context.Context, contentKey, format string) error {
	key, err := kvKey(contentKey, format)
	if err != nil {
		return fmt.Errorf("dedup forget: %w", err)
	}
	if err := s.kv.Purge(ctx, key); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		return fmt.Errorf("dedup forget %s: %w", key, err)
	}
	return nil
}

// Prune removes records created more than olderThan before now and
// returns how many it removed. A record that cannot be decoded is removed
// too: nothing could use it. A record rewritten while Prune runs is kept.
func (s *Store) Prune(ctx context.Context, olderThan time.Duration, now time.Time) (int, error) {
	if olderThan < 0 {
		return 0, fmt.Errorf("dedup prune: negative age %s", olderThan)
	}
	w, err := s.kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return 0, fmt.Errorf("dedup prune: %w", err)
	}
	defer func() { _ = w.Stop() }()
	cutoff := now.Add(-olderThan)
	type stale struct {
		key string
		rev uint64
	}
	var old []stale
	// The watcher sends every current entry, then nil.
	for done := false; !done; {
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("dedup prune: %w", ctx.Err())
		case e := <-w.Updates():
			if e == nil {
				done = true
				break
			}
			var r Record
			if json.Unmarshal(e.Value(), &r) != nil || r.CreatedAt.Before(cutoff) {
				old = append(old, stale{e.Key(), e.Revision()})
			}
		}
	}
	n := 0
	for _, o := range old {
		err := s.kv.Purge(ctx, o.key, jetstream.LastRevision(o.rev))
		switch {
		case err == nil:
			n++
		case errors.Is(err, jetstream.ErrKeyExists), isWrongLastSequence(err):
			// Rewritten since it was read: the content was converted again.
		default:
			return n, fmt.Errorf("dedup prune %s: %w", o.key, err)
		}
	}
	return n, nil
}

func isWrongLastSequence(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) &&
		(apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence || apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}
