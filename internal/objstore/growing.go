package objstore

import (
	"context"
	"encoding/base64"
	"fmt"
	"hash"
	"io"
	"net/http"
	"sync"

	"github.com/minio/minio-go/v7"
)

// Growing is a file still being written: the bytes below end are final
// once Wait(end) returns nil, and Wait returns the writer's error if it
// fails instead.
type Growing interface {
	io.ReaderAt
	Wait(ctx context.Context, end int64) error
}

// maxParts is S3's limit on the parts of one upload.
const maxParts = 10000

// UploadGrowing uploads the size bytes of src as bucket/key while src is
// still being written. Each part is sent once its bytes are final, never
// before: a request must not sit on a half-sent body while the writer is
// slow. The last part waits for the writer to finish, so the object
// appears only when src is complete, and never if src fails. progress, if
// set, is fed the bytes as they are sent. guard decides at the end
// whether the object may still be written and learns its upload id (see
// commit.go).
func (s *Store) UploadGrowing(ctx context.Context, bucket, key string, src Growing, size int64, meta map[string]string, progress io.Reader, guard Guard) (Object, error) {
	obj, err := s.uploadParts(ctx, bucket, key, src, size, meta, progress, guard)
	if err != nil {
		return Object{}, fmt.Errorf("upload %s/%s: %w", bucket, key, err)
	}
	return obj, nil
}

// uploadParts sends src as the parts of an upload of its own, several at
// a time, each once Wait says its bytes are final, and commits the upload.
// Any failure aborts this upload, and only this one.
func (s *Store) uploadParts(ctx context.Context, bucket, key string, src Growing, size int64, meta map[string]string, progress io.Reader, guard Guard) (obj Object, err error) {
	core := minio.Core{Client: s.client}
	uploadID, err := startUpload(ctx, core, bucket, key, meta)
	if err != nil {
		return Object{}, err
	}
	guard.started(uploadID)
	defer func() {
		if err != nil {
			s.abort(ctx, core, bucket, key, uploadID)
		}
	}()

	ps := growingPartSize(size, s.growingPart)
	count := max(int((size+ps-1)/ps), 1)
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	parts := make([]minio.ObjectPart, count)
	next := make(chan int)
	errc := make(chan error, partThreads)
	var wg sync.WaitGroup
	for range min(partThreads, count) {
		wg.Go(func() {
			for n := range next {
				off := int64(n) * ps
				part, err := s.uploadFinalPart(pctx, core, bucket, key, uploadID, n+1, src, off, min(ps, size-off), progress)
				if err != nil {
					errc <- err
					cancel()
					return
				}
				parts[n] = part
			}
		})
	}
feed:
	for n := range count {
		select {
		case next <- n:
		case <-pctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	select {
	case err := <-errc:
		return Object{}, err
	default:
	}
	if err := pctx.Err(); err != nil {
		return Object{}, err
	}

	// parts[n] is part n+1: already in the order S3 wants.
	complete, done := completion(parts)
	info, err := s.commit(ctx, core, bucket, key, uploadID, complete, done, guard)
	if err != nil {
		return Object{}, fmt.Errorf("complete: %w", err)
	}
	return Object{Bucket: bucket, Key: key, Size: size, ETag: info.ETag, VersionID: info.VersionID}, nil
}

// final is a file already written whole: every part of it is final.
type final struct{ io.ReaderAt }

func (final) Wait(context.Context, int64) error { return nil }

// uploadFinalPart waits until the part's bytes are final, then sends them
// with their CRC32C in the trailer.
func (s *Store) uploadFinalPart(ctx context.Context, core minio.Core, bucket, key, uploadID string, number int, src Growing, off, n int64, progress io.Reader) (minio.ObjectPart, error) {
	if err := src.Wait(ctx, off+n); err != nil {
		return minio.ObjectPart{}, err
	}
	crc := minio.ChecksumCRC32C.Hasher()
	trailer := http.Header{}
	trailer.Set(minio.ChecksumCRC32C.Key(), base64.StdEncoding.EncodeToString(crc.Sum(nil)))
	body := &partReader{r: io.NewSectionReader(src, off, n), crc: crc, trailer: trailer, progress: progress}
	part, err := core.PutObjectPart(ctx, bucket, key, uploadID, number, body, n, minio.PutObjectPartOptions{
		Trailer:              trailer,
		DisableContentSha256: true,
	})
	if err != nil {
		return minio.ObjectPart{}, fmt.Errorf("part %d: %w", number, err)
	}
	return part, nil
}

// growingPartSize keeps objstore's part size unless the object needs more
// than S3's 10,000 parts; a whole number of MiB keeps parts aligned to
// what the scratch file reads at once.
func growingPartSize(size, base int64) int64 {
	ps := int64(partSize)
	if base > 0 {
		ps = base
	}
	if need := (size + maxParts - 1) / maxParts; need > ps {
		ps = (need + 1<<20 - 1) &^ (1<<20 - 1)
	}
	return ps
}

// partReader computes a part's checksum as it is read, sets it in the
// trailer at the end of the body, and feeds progress.
type partReader struct {
	r        io.Reader
	crc      hash.Hash
	trailer  http.Header
	progress io.Reader
}

func (p *partReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	if n > 0 {
		p.crc.Write(b[:n])
		if p.progress != nil {
			p.progress.Read(b[:n])
		}
	}
	if err == io.EOF {
		p.trailer.Set(minio.ChecksumCRC32C.Key(), base64.StdEncoding.EncodeToString(p.crc.Sum(nil)))
	}
	return n, err
}

// startUpload starts a multipart upload of key with meta, its parts to be
// sent with a CRC32C trailer (what PutObject declares for one: the server
// then checks every part against the checksum that follows its body).
func startUpload(ctx context.Context, core minio.Core, bucket, key string, meta map[string]string) (string, error) {
	opts := minio.PutObjectOptions{ContentType: "application/octet-stream", UserMetadata: map[string]string{}}
	for k, v := range meta {
		opts.UserMetadata[k] = v
	}
	opts.UserMetadata["X-Amz-Checksum-Algorithm"] = minio.ChecksumCRC32C.String()
	uploadID, err := core.NewMultipartUpload(ctx, bucket, key, opts)
	if err != nil {
		return "", fmt.Errorf("start: %w", err)
	}
	return uploadID, nil
}

// completion is what completes an upload of parts, in order: the list S3
// wants and the object's composite CRC32C.
func completion(parts []minio.ObjectPart) ([]minio.CompletePart, minio.PutObjectOptions) {
	complete := make([]minio.CompletePart, len(parts))
	for i, p := range parts {
		complete[i] = minio.CompletePart{PartNumber: p.PartNumber, ETag: p.ETag, ChecksumCRC32C: p.ChecksumCRC32C}
	}
	var done minio.PutObjectOptions
	if crc, err := minio.ChecksumCRC32C.CompositeChecksum(parts); err == nil {
		done.UserMetadata = map[string]string{minio.ChecksumCRC32C.Key(): crc.Encoded(), "X-Amz-Checksum-Type": "COMPOSITE"}
	}
	return complete, done
}
