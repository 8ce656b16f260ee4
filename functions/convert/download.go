package convert

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"path/filepath"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/decompress"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/objstore"
)

// downloaded is the upload as downloaded to scratch.
type downloaded struct {
	path   string // the download, decompressed
	size   int64  // as uploaded
	sha256 string // of the object as uploaded
	codec  string // compression the upload came in
}

// download streams the object into the job's scratch file, decompressing
// gzip, xz and zstd on the way within the job's budget (package
// decompress decides what an upload may expand to), and checks the
// checksum the uploader gave.
func (h *Handler) download(ctx context.Context, j *job, tr tracker) (downloaded, error) {
	tr.set(ctx, events.StateDownloading, 0)
	j.log.Info("downloading", "stage", events.PhaseDownload, "attempt", j.attempt)
	in := downloaded{path: filepath.Join(j.dir, "input")}
	rc, obj, err := j.store.Open(ctx, j.Bucket, j.Key, j.VersionID, j.ETag)
	if err != nil {
		return in, classifyDownload(j, err)
	}
	defer rc.Close()
	in.size = obj.Size

	sum := newAsyncHash(sha256.New())
	defer sum.Close()
	meter := tr.meter(ctx, events.PhaseDownload, events.StateDownloading, obj.Size)
	res, err := decompress.Expand(ctx, io.TeeReader(rc, io.MultiWriter(sum, meter)), in.path, h.budget())
	in.codec = string(res.Codec)
	if err != nil {
		if _, decided := failure.As(err); decided {
			return in, err
		}
		return in, classifyDownload(j, err)
	}
	j.log.Info("downloaded", "stage", events.PhaseDownload, "codec", res.Codec, "size", res.Size, "allocated", res.Allocated)
	in.sha256 = hex.EncodeToString(sum.Sum())
	return in, verifyChecksum(obj, in.sha256)
}

// budget bounds a download: no larger than the largest image allowed,
// and no more data than the scratch disk holds beyond its reserve. Zeros
// are holes and cost no space.
func (h *Handler) budget() decompress.Budget {
	return decompress.Budget{
		MaxSize: h.cfg.MaxVirtualSize,
		Reserve: h.cfg.ScratchReserve,
	}
}

// isCompressed reports whether head starts a gzip, xz or zstd stream.
func isCompressed(head []byte) bool { return decompress.Detect(head) != decompress.None }

// verifyChecksum compares the sha256 of the bytes received with the one
// the uploader declared, as S3's x-amz-checksum-sha256 of a single-part
// upload or as x-amz-meta-imagepipe-sha256.
func verifyChecksum(obj objstore.Object, got string) error {
	if want := declaredSHA256(&obj); want != "" && want != got {
		return failure.Refused(events.PhaseDownload, events.RuleChecksum, fmt.Errorf("checksum mismatch: the upload declares sha256 %s, the bytes received hash to %s", want, got),
			"the file was damaged in transit or the declared checksum is wrong; upload it again")
	}
	return nil
}

// keyForExtension is the key whose extension must agree with the content
// of an upload compressed with codec.
func keyForExtension(key, codec string) string {
	return decompress.KeyForExtension(key, decompress.Codec(codec))
}

func classifyDownload(j *job, err error) error {
	switch {
	case objstore.IsChanged(err):
		return errSuperseded
	case objstore.IsNotFound(err):
		return failure.Permanent(events.PhaseDownload, fmt.Errorf("the object %s/%s no longer exists: it was deleted before it could be downloaded", j.Bucket, j.Key), "upload the image again")
	case objstore.IsPermanent(err):
		return failure.Permanent(events.PhaseDownload, err, "check the converter's S3 credentials can read the input bucket")
	case isNoSpace(err):
		return failure.Retryable(events.PhaseDownload, fmt.Errorf("scratch space full while downloading: %w", err), "free space in IMAGEPIPE_SCRATCH_DIR or lower IMAGEPIPE_MAX_CONCURRENT_JOBS")
	}
	return failure.Retryable(events.PhaseDownload, err, "")
}

// asyncHash hashes what is written to it on a goroutine of its own, so
// that hashing a download overlaps the network and the disk instead of
// adding to them. A few buffers bound its memory: a writer that gets ahead
// waits.
type asyncHash struct {
	h      hash.Hash
	chunks chan []byte
	free   chan []byte
	done   chan struct{}
	closed bool
}

const asyncHashBuffers, asyncHashBufferSize = 4, 1 << 20

func newAsyncHash(h hash.Hash) *asyncHash {
	a := &asyncHash{h: h, chunks: make(chan []byte, asyncHashBuffers), free: make(chan []byte, asyncHashBuffers), done: make(chan struct{})}
	for range asyncHashBuffers {
		a.free <- make([]byte, asyncHashBufferSize)
	}
	go func() {
		defer close(a.done)
		for b := range a.chunks {
			a.h.Write(b)
			a.free <- b[:cap(b)]
		}
	}()
	return a
}

func (a *asyncHash) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		b := <-a.free
		c := copy(b, p)
		a.chunks <- b[:c]
		p = p[c:]
	}
	return n, nil
}

// Sum waits for everything written to be hashed and returns the hash. No
// Write may follow.
func (a *asyncHash) Sum() []byte {
	a.Close()
	return a.h.Sum(nil)
}

// Close stops the hashing goroutine; a download that failed calls it
// without Sum.
func (a *asyncHash) Close() {
	if !a.closed {
		a.closed = true
		close(a.chunks)
	}
	<-a.done
}
