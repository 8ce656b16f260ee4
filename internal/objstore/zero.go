package objstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sync"

	"github.com/minio/minio-go/v7"
)

// A raw disk image is mostly zeros, and every part of it that is a hole
// of its scratch file is stored without being sent: the server copies it
// (UploadPartCopy) from a zero object kept once per output bucket. The
// converter neither reads, hashes nor sends those bytes; the server still
// writes them, but skips receiving and checking them.
//
// The zero object is never trusted: before an upload copies from it, its
// size and its stored CRC64NVME are checked against what zeros of that
// size must have (a closed formula, see crc64.go), and a zero object that
// is missing or wrong is written again. The copies are conditional on the
// ETag that was checked, so a zero object changed afterwards fails the
// copy instead of ending up in an output.

// Zeros asks an upload to compose the holes of its source server-side.
type Zeros struct {
	// Holes says which ranges of the source are holes.
	Holes Holes
	// Key is the zero object's key in the output bucket.
	Key string
}

// Holes knows which ranges of an upload's source read as zeros. It is
// asked about a range only once the range's bytes are final.
type Holes interface {
	// Hole reports whether the n bytes at off read as zeros. A range it
	// cannot tell about is not a hole.
	Hole(off, n int64) (bool, error)
}

// DefaultZeroObjectSize is the zero object's size, and so the longest
// zero run one copied part covers: one request per GiB of zeros.
const DefaultZeroObjectSize = 1 << 30

// maxCopyPart is S3's largest part made by UploadPartCopy.
const maxCopyPart = 5 << 30

// zeroSource is one upload's view of the zero object: checked (or
// written) once, and again if a copy finds it changed.
type zeroSource struct {
	s           *Store
	bucket, key string
	size        int64
	holes       Holes // of the source

	mu   sync.Mutex
	etag string // of the zero object as last checked; "" before
}

// ensure returns the ETag of a zero object that is right, checking it
// the first time and, with stale, again since a copy found it changed.
func (z *zeroSource) ensure(ctx context.Context, stale string) (string, error) {
	z.mu.Lock()
	defer z.mu.Unlock()
	if z.etag != "" && z.etag != stale {
		return z.etag, nil
	}
	etag, err := z.s.ensureZeroObject(ctx, z.bucket, z.key, z.size)
	if err != nil {
		return "", err
	}
	z.etag = etag
	return etag, nil
}

// copyPart stores n zero bytes as part number of the upload, copied from
// the zero object.
func (z *zeroSource) copyPart(ctx context.Context, core minio.Core, key, uploadID string, number int, n int64) (minio.CompletePart, error) {
	stale := ""
	for attempt := 0; ; attempt++ {
		etag, err := z.ensure(ctx, stale)
		if err != nil {
			return minio.CompletePart{}, err
		}
		h := http.Header{}
		minio.CopySrcOptions{Bucket: z.bucket, Object: z.key, MatchETag: etag}.Marshal(h)
		headers := make(map[string]string, len(h))
		for k := range h {
			headers[k] = h.Get(k)
		}
		part, err := core.CopyObjectPart(ctx, z.bucket, z.key, z.bucket, key, uploadID, number, 0, n, headers)
		if err == nil {
			return part, nil
		}
		if !IsChanged(err) && !IsNotFound(err) || attempt == 1 {
			// Not a failed precondition on the output: %v keeps IsChanged
			// from taking it for one.
			return minio.CompletePart{}, fmt.Errorf("part %d: copy zeros from %s/%s: %v", number, z.bucket, z.key, err)
		}
		stale = etag // changed or removed since it was checked
	}
}

// ensureZeroObject checks the zero object at bucket/key and writes it
// again unless it is size zero bytes; it returns the ETag of the object
// checked right.
func (s *Store) ensureZeroObject(ctx context.Context, bucket, key string, size int64) (string, error) {
	want := encodeCRC64(crc64Zeros(size))
	etag, err := s.checkZeroObject(ctx, bucket, key, size, want)
	if err == nil {
		return etag, nil
	}
	if !errors.Is(err, errZeroObjectWrong) {
		return "", err
	}
	// The checksum goes in the header, from the formula: the server
	// checks the body against it, and stores it for the next check.
	_, err = s.client.PutObject(ctx, bucket, key, io.LimitReader(zeroReader{}, size), size, minio.PutObjectOptions{
		ContentType:          "application/octet-stream",
		UserMetadata:         map[string]string{minio.ChecksumCRC64NVME.Key(): want},
		DisableMultipart:     true,
		DisableContentSha256: true,
	})
	if err != nil {
		return "", fmt.Errorf("write the zero object %s/%s: %w", bucket, key, err)
	}
	return s.checkZeroObject(ctx, bucket, key, size, want)
}

var errZeroObjectWrong = errors.New("the zero object is missing or not zeros")

// checkZeroObject returns the zero object's ETag if it is size bytes
// with the CRC64NVME of that many zeros.
func (s *Store) checkZeroObject(ctx context.Context, bucket, key string, size int64, want string) (string, error) {
	info, err := s.client.StatObject(ctx, bucket, key, minio.StatObjectOptions{Checksum: true})
	switch {
	case IsNotFound(err):
		return "", errZeroObjectWrong
	case err != nil:
		return "", fmt.Errorf("check the zero object %s/%s: %w", bucket, key, err)
	case info.Size != size || info.ChecksumCRC64NVME != want:
		return "", errZeroObjectWrong
	}
	return info.ETag, nil
}

// zeroReader reads zeros.
type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// zeroBuf feeds progress for copied parts; it is never written.
var zeroBuf = make([]byte, 1<<20)

// feedProgress tells progress that n bytes went up.
func feedProgress(progress io.Reader, n int64) {
	if progress == nil {
		return
	}
	for n > 0 {
		c := min(n, int64(len(zeroBuf)))
		progress.Read(zeroBuf[:c])
		n -= c
	}
}
