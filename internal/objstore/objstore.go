// Package objstore wraps minio-go for imagepipe: streaming downloads and
// parallel multipart uploads of large files, and the classification of S3
// errors into "will never work" and "try again later".
package objstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"iter"
	"net/http"
	"strings"
	"time"

	"github.com/imagepipe/imagepipe/internal/secrets"
	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/minio/minio-go/v7/pkg/tags"
)

// Config is how to reach S3. Every function that touches storage embeds it.
type Config struct {
	Endpoint  string `env:"IMAGEPIPE_S3_ENDPOINT" envDefault:"127.0.0.1:9000" takes:"HOST or HOST:PORT, no scheme" doc:"S3 endpoint host:port"`
	AccessKey string `env:"IMAGEPIPE_S3_ACCESS_KEY" doc:"S3 access key (minioadmin in imagepipe dev; refused unless the endpoint is on loopback); with no key set, the AWS credential chain (AWS_ACCESS_KEY_ID…, ~/.aws/credentials, instance role)"`
	SecretKey string `env:"IMAGEPIPE_S3_SECRET_KEY" secret:"true" doc:"S3 secret key (minioadmin in imagepipe dev; refused unless the endpoint is on loopback)"`
	Secure    bool   `env:"IMAGEPIPE_S3_SECURE" envDefault:"false" doc:"TLS to S3 (a CA of your own: SSL_CERT_FILE=/path/ca.pem)"`
	Region    string `env:"IMAGEPIPE_S3_REGION" doc:"S3 region, for S3 services that need it"`
	// SessionToken goes with temporary keys (STS AssumeRole and the like).
	SessionToken string `env:"IMAGEPIPE_S3_SESSION_TOKEN" secret:"true" doc:"the session token that goes with temporary S3 keys (STS AssumeRole, AWS SSO)"`

	// The same keys read from files (a mounted Kubernetes Secret), so
	// they need not sit in the environment; used when
	// IMAGEPIPE_S3_ACCESS_KEY and IMAGEPIPE_S3_SECRET_KEY are empty.
	AccessKeyFromFile string `env:"IMAGEPIPE_S3_ACCESS_KEY_FILE,file" doc:"a file holding the S3 access key (a mounted Kubernetes Secret; a trailing newline is ignored), used when IMAGEPIPE_S3_ACCESS_KEY is empty"`
	SecretKeyFromFile string `env:"IMAGEPIPE_S3_SECRET_KEY_FILE,file" secret:"true" doc:"a file holding the S3 secret key, used when IMAGEPIPE_S3_SECRET_KEY is empty"`

	// ZeroObjectSize is the size of the zero object each output bucket
	// keeps, and so the longest run of zeros one copied part covers.
	ZeroObjectSize int64 `env:"IMAGEPIPE_S3_ZERO_OBJECT_SIZE" envDefault:"1073741824" doc:"size in bytes of the zero object kept in the output bucket (under .imagepipe/ below the output prefix), which raw outputs' runs of zeros are copied from server-side instead of sent; 5 MiB to 5 GiB"`
}

// Upload tuning: large parts in parallel, and a CRC64NVME trailer instead
// of signing a SHA-256 of every payload, which costs a full extra read.
const (
	partSize    = 128 << 20
	partThreads = 4
)

// PartSize is the size of every part of a large upload but the last.
const PartSize = partSize

// Store is an S3 client.
type Store struct {
	client *minio.Client
	// growingPart overrides UploadGrowing's part size, for tests that
	// cannot afford 128 MiB parts; 0 keeps the default.
	growingPart int64
	// zeroObjectSize is Config.ZeroObjectSize; 0 is the default.
	zeroObjectSize int64
}

// zeroSize is the size of the zero object.
func (s *Store) zeroSize() int64 {
	if s.zeroObjectSize > 0 {
		return s.zeroObjectSize
	}
	return DefaultZeroObjectSize
}

// New builds a client. It does not contact the server.
func New(cfg Config) (*Store, error) {
	if cfg.Endpoint == "" {
		return nil, errors.New("s3: endpoint is empty (set IMAGEPIPE_S3_ENDPOINT)")
	}
	if cfg.AccessKey == "" {
		cfg.AccessKey = strings.TrimRight(cfg.AccessKeyFromFile, "\r\n")
	}
	if cfg.SecretKey == "" {
		cfg.SecretKey = strings.TrimRight(cfg.SecretKeyFromFile, "\r\n")
	}
	if (cfg.AccessKey == "") != (cfg.SecretKey == "") {
		return nil, errors.New("s3: IMAGEPIPE_S3_ACCESS_KEY and IMAGEPIPE_S3_SECRET_KEY (or their _FILE forms) go together: set both, or neither to use the AWS credential chain")
	}
	if cfg.ZeroObjectSize != 0 && (cfg.ZeroObjectSize < 5<<20 || cfg.ZeroObjectSize > maxCopyPart) {
		return nil, fmt.Errorf("s3: IMAGEPIPE_S3_ZERO_OBJECT_SIZE is %d bytes; set it between 5 MiB (5242880) and 5 GiB (5368709120), S3's bounds for a copied part", cfg.ZeroObjectSize)
	}
	creds := awsChain()
	if cfg.AccessKey != "" {
		if err := secrets.CheckS3(cfg.Endpoint, cfg.AccessKey, cfg.SecretKey); err != nil {
			return nil, fmt.Errorf("s3: %w", err)
		}
		creds = credentials.NewStaticV4(cfg.AccessKey, cfg.SecretKey, cfg.SessionToken)
	} else if cfg.SessionToken != "" {
		return nil, errors.New("s3: IMAGEPIPE_S3_SESSION_TOKEN goes with IMAGEPIPE_S3_ACCESS_KEY and IMAGEPIPE_S3_SECRET_KEY; with neither set, the AWS credential chain's own session token (AWS_SESSION_TOKEN, ~/.aws/credentials) is used")
	}
	c, err := minio.New(cfg.Endpoint, &minio.Options{
		Creds:           creds,
		Secure:          cfg.Secure,
		Region:          cfg.Region,
		TrailingHeaders: true,
	})
	if err != nil {
		return nil, fmt.Errorf("s3 client for %s: %w", cfg.Endpoint, err)
	}
	return &Store{client: c, zeroObjectSize: cfg.ZeroObjectSize}, nil
}

// awsChain is the AWS SDKs' standard credential chain, for a deployment
// that gives imagepipe no key of its own: the environment
// (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), then the
// shared credentials file (AWS_SHARED_CREDENTIALS_FILE or
// ~/.aws/credentials, profile AWS_PROFILE or default), then the instance's
// or pod's role (EC2 instance metadata, ECS task role, EKS web identity).
// Each is asked when a request needs signing, not here, so New still
// contacts nothing; temporary credentials are renewed as they expire.
func awsChain() *credentials.Credentials {
	return credentials.NewChainCredentials([]credentials.Provider{
		&credentials.EnvAWS{},
		&credentials.FileAWSCredentials{},
		&credentials.IAM{},
	})
}

// Client exposes the underlying client for provisioning and tests.
func (s *Store) Client() *minio.Client { return s.client }

// Object describes one stored object.
type Object struct {
	Bucket    string
	Key       string
	Size      int64
	ETag      string
	VersionID string
	// Metadata is the user metadata, lower-case keys without x-amz-meta-;
	// nil when a listing did not include it.
	Metadata     map[string]string
	Checksum     string // x-amz-checksum-sha256, base64, when the uploader sent one
	LastModified time.Time
	// CRC64NVME is the object's full-object CRC64NVME, base64 as S3
	// writes it: what the server stores for it, or, from an upload, what
	// the upload combined from its parts (the server keeps it too unless
	// parts were copied from the zero object).
	CRC64NVME string
	// ZeroBytes, from an upload, is how many of its bytes were copied
	// from the zero object instead of sent.
	ZeroBytes int64
}

func objectFrom(bucket string, info minio.ObjectInfo) Object {
	meta := make(map[string]string, len(info.UserMetadata))
	for k, v := range info.UserMetadata {
		meta[normalizeMetaKey(k)] = v
	}
	return Object{
		Bucket:    bucket,
		Key:       info.Key,
		Size:      info.Size,
		ETag:      info.ETag,
		VersionID: info.VersionID,
		Metadata:  meta,
		Checksum:  info.ChecksumSHA256,
		CRC64NVME: info.ChecksumCRC64NVME,

		LastModified: info.LastModified,
	}
}

// List yields the objects under prefix. It asks for their user metadata,
// which MinIO lists; other servers ignore the request, Metadata is then
// nil, and a caller that must know stats the object.
func (s *Store) List(ctx context.Context, bucket, prefix string) iter.Seq2[Object, error] {
	return func(yield func(Object, error) bool) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel() // stops the lister when the caller stops early
		for info := range s.client.ListObjects(ctx, bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true, WithMetadata: true}) {
			if info.Err != nil {
				yield(Object{}, fmt.Errorf("list %s/%s: %w", bucket, prefix, info.Err))
				return
			}
			obj := objectFrom(bucket, info)
			if info.UserMetadata == nil && info.Metadata == nil {
				obj.Metadata = nil
			}
			for k, v := range info.Metadata {
				if len(v) > 0 {
					obj.Metadata[normalizeMetaKey(k)] = v[0]
				}
			}
			if !yield(obj, nil) {
				return
			}
		}
	}
}

// PutStream stores what r yields as bucket/key. size is -1 when unknown,
// and then partSize bounds the memory the upload buffers. The object
// appears only when r has been read to its end without an error. With
// ifAbsent, it appears only if no object was stored at the key meanwhile;
// IsChanged then says why it failed (see putStreamIfAbsent).
func (s *Store) PutStream(ctx context.Context, bucket, key string, r io.Reader, size int64, partSize uint64, meta map[string]string, ifAbsent bool) error {
	var err error
	if ifAbsent {
		err = s.putStreamIfAbsent(ctx, bucket, key, r, size, int64(partSize), meta)
	} else {
		_, err = s.client.PutObject(ctx, bucket, key, r, size, minio.PutObjectOptions{
			ContentType:  "application/octet-stream",
			UserMetadata: meta,
			PartSize:     partSize,
			// A CRC32C trailer instead of a SHA-256 of every part, which
			// would cost a second pass over buffered data.
			DisableContentSha256: true,
			Checksum:             minio.ChecksumCRC32C,
		})
	}
	if err != nil {
		return fmt.Errorf("put %s/%s: %w", bucket, key, err)
	}
	return nil
}

// putStreamIfAbsent is PutStream as a multipart upload of its own,
// completed with If-None-Match: *. S3 decides the condition when the
// upload completes, so an object stored at the key at any time before
// that wins. minio-go's PutObject drops the condition from the completion
// of a multipart upload, and MinIO holds the key's lock for the whole of a
// conditional single PUT, which would make a racing upload wait on a slow
// source: hence a multipart upload even for one part. Parts are read and
// sent one at a time, so it buffers one part.
func (s *Store) putStreamIfAbsent(ctx context.Context, bucket, key string, r io.Reader, size, partSize int64, meta map[string]string) (err error) {
	if size >= 0 {
		partSize = growingPartSize(size, minPartSize)
	}
	partSize = max(partSize, minPartSize)
	core := minio.Core{Client: s.client}
	uploadID, err := startUpload(ctx, core, bucket, key, meta, true)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			s.abort(ctx, core, bucket, key, uploadID)
		}
	}()
	buf := make([]byte, partSize)
	var parts []sentPart
	for n := 1; ; n++ {
		got, rerr := io.ReadFull(r, buf)
		if rerr != nil && rerr != io.EOF && rerr != io.ErrUnexpectedEOF {
			return rerr
		}
		if got > 0 || n == 1 {
			part, err := s.uploadFinalPart(ctx, core, bucket, key, uploadID, n, final{bytes.NewReader(buf[:got])}, 0, int64(got), nil)
			if err != nil {
				return err
			}
			parts = append(parts, part)
		}
		if rerr != nil {
			break
		}
	}
	complete, done, _ := completion(parts, true)
	done.SetMatchETagExcept("*")
	if _, err := core.CompleteMultipartUpload(ctx, bucket, key, uploadID, complete, done); err != nil {
		return fmt.Errorf("complete: %w", err)
	}
	return nil
}

// minPartSize is the smallest part a stream is sent in (S3 takes 5 MiB
// and up, but for the last part); one such part is what it buffers.
const minPartSize = 16 << 20

// Stat returns an object's attributes.
func (s *Store) Stat(ctx context.Context, bucket, key string) (Object, error) {
	info, err := s.client.StatObject(ctx, bucket, key, minio.StatObjectOptions{Checksum: true})
	if err != nil {
		return Object{}, fmt.Errorf("stat %s/%s: %w", bucket, key, err)
	}
	return objectFrom(bucket, info), nil
}

// Open starts reading one version of an object. When etag is set the read
// is conditional on it, so a job converts exactly the content it was
// queued for and never a later overwrite. The caller closes the reader.
func (s *Store) Open(ctx context.Context, bucket, key, versionID, etag string) (io.ReadCloser, Object, error) {
	opts := minio.GetObjectOptions{Checksum: true}
	opts.VersionID = versionID
	if etag != "" {
		if err := opts.SetMatchETag(etag); err != nil {
			return nil, Object{}, fmt.Errorf("download %s/%s: %w", bucket, key, err)
		}
	}
	obj, err := s.client.GetObject(ctx, bucket, key, opts)
	if err != nil {
		return nil, Object{}, fmt.Errorf("download %s/%s: %w", bucket, key, err)
	}
	info, err := obj.Stat()
	if err != nil {
		obj.Close()
		return nil, Object{}, fmt.Errorf("download %s/%s: %w", bucket, key, err)
	}
	return &sizedReader{obj: obj, want: info.Size, name: bucket + "/" + key}, objectFrom(bucket, info), nil
}

// sizedReader reports a short read as an error: a connection that drops
// mid-object must not look like a complete, smaller file.
type sizedReader struct {
	obj  *minio.Object
	want int64
	got  int64
	name string
}

func (r *sizedReader) Read(p []byte) (int, error) {
	n, err := r.obj.Read(p)
	r.got += int64(n)
	if err == io.EOF && r.got != r.want {
		return n, fmt.Errorf("download %s: got %d of %d bytes: %w", r.name, r.got, r.want, io.ErrUnexpectedEOF)
	}
	if err != nil && err != io.EOF {
		err = fmt.Errorf("download %s: %w", r.name, err)
	}
	return n, err
}

func (r *sizedReader) Close() error { return r.obj.Close() }

// RangeReader reads byte ranges of one object.
type RangeReader interface {
	io.ReaderAt
	io.Closer
}

// ReaderAt reads ranges of an object without downloading it, for looking
// at a header before deciding what to do with the rest.
func (s *Store) ReaderAt(ctx context.Context, bucket, key, versionID string) (RangeReader, error) {
	obj, err := s.client.GetObject(ctx, bucket, key, minio.GetObjectOptions{VersionID: versionID})
	if err != nil {
		return nil, fmt.Errorf("read %s/%s: %w", bucket, key, err)
	}
	return obj, nil
}

// Copy copies one version of an object server-side, with the metadata
// and tags given instead of the source's. When srcETag is set the copy is
// of exactly that content: if the source changed, the copy fails and
// IsChanged says so. guard decides at the end whether the copy may
// still be written and learns its upload id (see commit.go).
//
// The copy is a multipart upload of its own, whatever the size, so that it
// commits like every other write of an output: ComposeObject copies a
// small object in one request that no guard can veto.
func (s *Store) Copy(ctx context.Context, srcBucket, srcKey, srcVersion, srcETag, dstBucket, dstKey string, meta, tagValues map[string]string, guard Guard) (Object, error) {
	obj, err := s.copyParts(ctx, minio.CopySrcOptions{Bucket: srcBucket, Object: srcKey, VersionID: srcVersion, MatchETag: srcETag}, dstBucket, dstKey, meta, tagValues, guard)
	if err != nil {
		return Object{}, fmt.Errorf("copy %s/%s to %s/%s: %w", srcBucket, srcKey, dstBucket, dstKey, err)
	}
	return obj, nil
}

func (s *Store) copyParts(ctx context.Context, src minio.CopySrcOptions, dstBucket, dstKey string, meta, tagValues map[string]string, guard Guard) (obj Object, err error) {
	sopts := minio.StatObjectOptions{VersionID: src.VersionID}
	if src.MatchETag != "" {
		if err := sopts.SetMatchETag(src.MatchETag); err != nil {
			return Object{}, err
		}
	}
	info, err := s.client.StatObject(ctx, src.Bucket, src.Object, sopts)
	if err != nil {
		return Object{}, err
	}
	// Every part copies from the source as it was just read.
	src.VersionID = info.VersionID
	src.MatchETag = info.ETag
	h := http.Header{}
	src.Marshal(h)
	srcHeaders := make(map[string]string, len(h))
	for k := range h {
		srcHeaders[k] = h.Get(k)
	}

	core := minio.Core{Client: s.client}
	uploadID, err := core.NewMultipartUpload(ctx, dstBucket, dstKey, minio.PutObjectOptions{
		ContentType: "application/octet-stream", UserMetadata: meta, UserTags: tagValues,
	})
	if err != nil {
		return Object{}, fmt.Errorf("start: %w", err)
	}
	guard.started(uploadID)
	defer func() {
		if err != nil {
			s.abort(ctx, core, dstBucket, dstKey, uploadID)
		}
	}()
	size := info.Size
	ps := growingPartSize(size, s.growingPart)
	count := max(int((size+ps-1)/ps), 1)
	parts := make([]minio.CompletePart, count)
	for n := range count {
		off, length := int64(n)*ps, min(ps, size-int64(n)*ps)
		if size == 0 {
			length = -1 // the whole of an empty object: no range
		}
		part, err := core.CopyObjectPart(ctx, src.Bucket, src.Object, dstBucket, dstKey, uploadID, n+1, off, length, srcHeaders)
		if err != nil {
			return Object{}, fmt.Errorf("part %d: %w", n+1, err)
		}
		parts[n] = part
	}
	done, err := s.commit(ctx, core, dstBucket, dstKey, uploadID, parts, minio.PutObjectOptions{}, guard)
	if err != nil {
		return Object{}, fmt.Errorf("complete: %w", err)
	}
	return Object{Bucket: dstBucket, Key: dstKey, Size: size, ETag: done.ETag, VersionID: done.VersionID}, nil
}

// File is a complete local file to upload: its parts are read with
// ReadAt, several at a time, so a reader that serves a sparse raw image's
// holes from memory spares the disk reading them.
type File interface {
	io.ReaderAt
	Size() int64
}

// Upload uploads f with parallel multipart parts. progress, if set, is
// fed the bytes as they are sent. guard decides at the end whether the
// object may still be written and learns its upload id (see commit.go);
// the zero Guard replaces whatever the key holds.
func (s *Store) Upload(ctx context.Context, bucket, key string, f File, meta map[string]string, progress io.Reader, guard Guard) (Object, error) {
	// The file is whole: if no part of it is a hole, nothing is copied,
	// and the upload can have the server keep its CRC64NVME.
	if guard.Zeros != nil && (guard.Zeros.Holes == nil || !s.anyHolePart(f.Size(), guard.Zeros.Holes)) {
		guard.Zeros = nil
	}
	obj, err := s.uploadParts(ctx, bucket, key, final{f}, f.Size(), meta, progress, guard)
	if err != nil {
		return Object{}, fmt.Errorf("upload %s/%s: %w", bucket, key, err)
	}
	return obj, nil
}

// anyHolePart reports whether a part of an upload of size bytes would be
// a hole; where the file system cannot say, none is.
func (s *Store) anyHolePart(size int64, holes Holes) bool {
	ps := growingPartSize(size, s.growingPart)
	for off := int64(0); off < size; off += ps {
		if hole, err := holes.Hole(off, min(ps, size-off)); err == nil && hole {
			return true
		}
	}
	return false
}

// SetTags replaces the tags of one version of an object ("" is the
// latest). Unlike metadata, tags can be set once an object is written,
// without copying it.
func (s *Store) SetTags(ctx context.Context, bucket, key, versionID string, values map[string]string) error {
	t, err := tags.NewTags(values, true)
	if err != nil {
		return fmt.Errorf("tag %s/%s: %w", bucket, key, err)
	}
	if err := s.client.PutObjectTagging(ctx, bucket, key, t, minio.PutObjectTaggingOptions{VersionID: versionID}); err != nil {
		return fmt.Errorf("tag %s/%s: %w", bucket, key, err)
	}
	return nil
}

// Tags returns the tags of the latest version of an object.
func (s *Store) Tags(ctx context.Context, bucket, key string) (map[string]string, error) {
	t, err := s.client.GetObjectTagging(ctx, bucket, key, minio.GetObjectTaggingOptions{})
	if err != nil {
		return nil, fmt.Errorf("read tags of %s/%s: %w", bucket, key, err)
	}
	return t.ToMap(), nil
}

// PutBytes stores a small object such as an error report.
func (s *Store) PutBytes(ctx context.Context, bucket, key string, body []byte, contentType string, meta map[string]string) error {
	_, err := s.client.PutObject(ctx, bucket, key, bytesReader(body), int64(len(body)), minio.PutObjectOptions{
		ContentType:  contentType,
		UserMetadata: meta,
	})
	if err != nil {
		return fmt.Errorf("put %s/%s: %w", bucket, key, err)
	}
	return nil
}

// Remove deletes an object; a missing object is not an error.
func (s *Store) Remove(ctx context.Context, bucket, key string) error {
	if err := s.client.RemoveObject(ctx, bucket, key, minio.RemoveObjectOptions{}); err != nil && !IsNotFound(err) {
		return fmt.Errorf("remove %s/%s: %w", bucket, key, err)
	}
	return nil
}

// errorResponse finds the S3 error in err's chain; minio.ToErrorResponse
// looks at err itself only, not through wrapping.
func errorResponse(err error) minio.ErrorResponse {
	var r minio.ErrorResponse
	if errors.As(err, &r) {
		return r
	}
	return minio.ToErrorResponse(err)
}

// IsNotFound reports whether err says the bucket or object does not exist.
func IsNotFound(err error) bool {
	switch errorResponse(err).Code {
	case minio.NoSuchKey, minio.NoSuchBucket, "NoSuchVersion":
		return true
	}
	return false
}

// IsChanged reports whether a conditional read failed because the object
// was overwritten after the job was queued.
func IsChanged(err error) bool {
	r := errorResponse(err)
	return r.Code == "PreconditionFailed" || r.StatusCode == http.StatusPreconditionFailed
}

// IsPermanent reports whether no retry can make err go away: the object or
// bucket is gone, or access is denied.
func IsPermanent(err error) bool {
	if IsNotFound(err) || IsChanged(err) {
		return true
	}
	switch errorResponse(err).Code {
	case "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidBucketName", "InvalidObjectName", "KeyTooLongError":
		return true
	}
	return false
}
