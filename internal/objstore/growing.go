package objstore

import (
	"context"
	"encoding/base64"
	"encoding/binary"
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
// With guard.Zeros, each run of parts that are holes of the source is
// copied from the zero object instead (see zero.go). Any failure aborts
// this upload, and only this one.
func (s *Store) uploadParts(ctx context.Context, bucket, key string, src Growing, size int64, meta map[string]string, progress io.Reader, guard Guard) (obj Object, err error) {
	ps := growingPartSize(size, s.growingPart)
	var zeros *zeroSource
	if guard.Zeros != nil && guard.Zeros.Holes != nil && s.zeroSize() >= ps {
		zeros = &zeroSource{s: s, bucket: bucket, key: guard.Zeros.Key, size: s.zeroSize(), holes: guard.Zeros.Holes}
	}
	// S3 keeps a full-object checksum only for an upload whose every part
	// was sent with one, and MinIO refuses copied parts into an upload
	// that declared one: an upload that may copy zeros declares none.
	native := zeros == nil
	core := minio.Core{Client: s.client}
	uploadID, err := startUpload(ctx, core, bucket, key, meta, native)
	if err != nil {
		return Object{}, err
	}
	guard.started(uploadID)
	defer func() {
		if err != nil {
			s.abort(ctx, core, bucket, key, uploadID)
		}
	}()

	count := max(int((size+ps-1)/ps), 1)
	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// sent[n] is the part that starts at slot n, if one does: a copied
	// run of zeros covers several slots, and S3 takes part numbers with
	// gaps between them.
	sent := make([]*sentPart, count)
	next := make(chan partJob)
	errc := make(chan error, partThreads+1)
	var wg sync.WaitGroup
	for range min(partThreads, count) {
		wg.Go(func() {
			for job := range next {
				part, err := s.sendPart(pctx, core, bucket, key, uploadID, src, zeros, job, progress)
				if err != nil {
					errc <- err
					cancel()
					return
				}
				sent[job.number-1] = &part
			}
		})
	}
	if err := planParts(pctx, src, size, ps, zeros, next); err != nil && pctx.Err() == nil {
		errc <- err
		cancel()
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

	parts := make([]sentPart, 0, count)
	for _, p := range sent {
		if p != nil {
			parts = append(parts, *p)
		}
	}
	complete, done, whole := completion(parts, native)
	info, err := s.commit(ctx, core, bucket, key, uploadID, complete, done, guard)
	if err != nil {
		return Object{}, fmt.Errorf("complete: %w", err)
	}
	obj = Object{Bucket: bucket, Key: key, Size: size, ETag: info.ETag, VersionID: info.VersionID, CRC64NVME: whole}
	for _, p := range parts {
		if p.zero {
			obj.ZeroBytes += p.size
		}
	}
	return obj, nil
}

// partJob is one part to store: its bytes at off, sent or, for a run of
// holes, copied from the zero object.
type partJob struct {
	number int
	off, n int64
	zero   bool
}

// sentPart is a part stored: what completing the upload needs, and its
// CRC64NVME for the object's.
type sentPart struct {
	number int
	etag   string
	size   int64
	crc    uint64
	zero   bool
}

// planParts hands out the parts of src in order: one per part-sized slot,
// but a run of slots that are holes becomes one part copied from the
// zero object, as long as the zero object. A slot is asked about only
// once its bytes are final.
func planParts(ctx context.Context, src Growing, size, ps int64, zeros *zeroSource, next chan<- partJob) error {
	send := func(j partJob) error {
		select {
		case next <- j:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	var run *partJob // the zero run being gathered
	count := max(int((size+ps-1)/ps), 1)
	for n := range count {
		off := int64(n) * ps
		length := min(ps, size-off)
		hole := false
		if zeros != nil && length > 0 {
			if err := src.Wait(ctx, off+length); err != nil {
				return err
			}
			var err error
			if hole, err = zeros.holes.Hole(off, length); err != nil {
				return err
			}
		}
		if hole && run != nil && run.n+length <= zeros.size {
			run.n += length
			continue
		}
		if run != nil {
			if err := send(*run); err != nil {
				return err
			}
			run = nil
		}
		if hole {
			run = &partJob{number: n + 1, off: off, n: length, zero: true}
			continue
		}
		if err := send(partJob{number: n + 1, off: off, n: length}); err != nil {
			return err
		}
	}
	if run != nil {
		return send(*run)
	}
	return nil
}

// sendPart stores one part: copied from the zero object, or sent.
func (s *Store) sendPart(ctx context.Context, core minio.Core, bucket, key, uploadID string, src Growing, zeros *zeroSource, job partJob, progress io.Reader) (sentPart, error) {
	if !job.zero {
		return s.uploadFinalPart(ctx, core, bucket, key, uploadID, job.number, src, job.off, job.n, progress)
	}
	part, err := zeros.copyPart(ctx, core, key, uploadID, job.number, job.n)
	if err != nil {
		return sentPart{}, err
	}
	feedProgress(progress, job.n)
	return sentPart{number: job.number, etag: part.ETag, size: job.n, crc: crc64Zeros(job.n), zero: true}, nil
}

// final is a file already written whole: every part of it is final.
type final struct{ io.ReaderAt }

func (final) Wait(context.Context, int64) error { return nil }

// uploadFinalPart waits until the part's bytes are final, then sends them
// with their CRC64NVME in the trailer, which the server checks.
func (s *Store) uploadFinalPart(ctx context.Context, core minio.Core, bucket, key, uploadID string, number int, src Growing, off, n int64, progress io.Reader) (sentPart, error) {
	if err := src.Wait(ctx, off+n); err != nil {
		return sentPart{}, err
	}
	crc := minio.ChecksumCRC64NVME.Hasher()
	trailer := http.Header{}
	trailer.Set(minio.ChecksumCRC64NVME.Key(), base64.StdEncoding.EncodeToString(crc.Sum(nil)))
	body := &partReader{r: io.NewSectionReader(src, off, n), crc: crc, trailer: trailer, progress: progress}
	part, err := core.PutObjectPart(ctx, bucket, key, uploadID, number, body, n, minio.PutObjectPartOptions{
		Trailer:              trailer,
		DisableContentSha256: true,
	})
	if err != nil {
		return sentPart{}, fmt.Errorf("part %d: %w", number, err)
	}
	if body.read != n {
		return sentPart{}, fmt.Errorf("part %d: read %d of %d bytes", number, body.read, n)
	}
	return sentPart{number: number, etag: part.ETag, size: n, crc: binary.BigEndian.Uint64(crc.Sum(nil))}, nil
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
	read     int64
}

func (p *partReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	if n > 0 {
		p.crc.Write(b[:n])
		p.read += int64(n)
		if p.progress != nil {
			p.progress.Read(b[:n])
		}
	}
	if err == io.EOF {
		p.trailer.Set(minio.ChecksumCRC64NVME.Key(), base64.StdEncoding.EncodeToString(p.crc.Sum(nil)))
	}
	return n, err
}

// startUpload starts a multipart upload of key with meta. A native one
// declares a full-object CRC64NVME, which the server then keeps and
// serves to any client that asks (HEAD with x-amz-checksum-mode); its
// parts must all be sent, each with its CRC64NVME in the trailer.
func startUpload(ctx context.Context, core minio.Core, bucket, key string, meta map[string]string, native bool) (string, error) {
	opts := minio.PutObjectOptions{ContentType: "application/octet-stream", UserMetadata: map[string]string{}}
	for k, v := range meta {
		opts.UserMetadata[k] = v
	}
	if native {
		opts.UserMetadata["X-Amz-Checksum-Algorithm"] = minio.ChecksumCRC64NVME.String()
		opts.UserMetadata["X-Amz-Checksum-Type"] = "FULL_OBJECT"
	}
	uploadID, err := core.NewMultipartUpload(ctx, bucket, key, opts)
	if err != nil {
		return "", fmt.Errorf("start: %w", err)
	}
	return uploadID, nil
}

// completion is what completes an upload of parts, in order: the list S3
// wants, the options, and the object's CRC64NVME, combined from the
// parts'. A native upload hands the server that CRC to check and keep.
func completion(parts []sentPart, native bool) ([]minio.CompletePart, minio.PutObjectOptions, string) {
	complete := make([]minio.CompletePart, len(parts))
	var whole uint64
	for i, p := range parts {
		complete[i] = minio.CompletePart{PartNumber: p.number, ETag: p.etag}
		if native {
			complete[i].ChecksumCRC64NVME = encodeCRC64(p.crc)
		}
		whole = crc64Combine(whole, p.crc, p.size)
	}
	var done minio.PutObjectOptions
	if native {
		done.UserMetadata = map[string]string{minio.ChecksumCRC64NVME.Key(): encodeCRC64(whole), "X-Amz-Checksum-Type": "FULL_OBJECT"}
	}
	return complete, done, encodeCRC64(whole)
}
