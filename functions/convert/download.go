package convert

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/therootcompany/xz"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/direct"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/objstore"
)

// Compression codecs recognised on download, by magic number, not name.
const (
	codecNone = ""
	codecGzip = "gzip"
	codecXZ   = "xz"
	codecZstd = "zstd"
)

var (
	magicGzip = []byte{0x1f, 0x8b}
	magicXZ   = []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}
	magicZstd = []byte{0x28, 0xb5, 0x2f, 0xfd}
)

// download streams the object into the job's scratch file, decompressing
// gzip, xz and zstd on the way, and checks the checksum the uploader gave.
func (h *Handler) download(ctx context.Context, j *job) error {
	h.setState(ctx, j, events.StateDownloading, 0)
	j.log.Info("downloading", "stage", events.PhaseDownload, "attempt", j.attempt)
	rc, obj, err := h.store.Open(ctx, j.Bucket, j.Key, j.VersionID, j.ETag)
	if err != nil {
		return classifyDownload(j, err)
	}
	defer rc.Close()
	j.inputSize = obj.Size
	j.meta = obj.Metadata
	if f := obj.Metadata[MetaFormat]; f != "" && j.ConvertJob.OutputFormat == "" {
		if f != "raw" && f != "qcow2" {
			return failure.Refused(events.PhaseDownload, "output-format", fmt.Errorf("the upload asks for output format %q", f),
				"set x-amz-meta-imagepipe-format to raw or qcow2, or leave it out")
		}
		j.outFormat = f
	}

	sum := newAsyncHash(sha256.New())
	defer sum.Close()
	meter := h.newMeter(ctx, j, events.PhaseDownload, events.StateDownloading, obj.Size)
	body := &readErrs{r: rc}
	br := bufio.NewReaderSize(io.TeeReader(body, io.MultiWriter(sum, meter)), 1<<20)
	src, codec, err := decompressor(br)
	if windowTooLarge(err) {
		return refuseWindow(codec)
	}
	if err != nil {
		return failure.Permanent(events.PhaseDownload, err, "upload the file again; its compressed stream is damaged")
	}
	j.codec = codec

	f, err := direct.Create(j.input)
	if err != nil {
		return failure.Retryable(events.PhaseDownload, fmt.Errorf("create scratch file: %w", err), "")
	}
	// A small compressed file may expand without bound; nothing larger than
	// the largest image allowed is worth writing.
	limit := h.cfg.MaxVirtualSize
	n, err := io.Copy(f, io.LimitReader(src, limit+1))
	if cerr := f.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		if windowTooLarge(err) {
			return refuseWindow(codec)
		}
		if codec != codecNone && body.err == nil && !isNoSpace(err) && ctx.Err() == nil {
			return failure.Permanent(events.PhaseDownload, fmt.Errorf("decompress %s stream: %w", codec, err), "upload the file again; its compressed stream is damaged or truncated")
		}
		return classifyDownload(j, err)
	}
	if n > limit {
		return failure.Refused(events.PhaseDownload, "virtual-size", fmt.Errorf("the %s stream expands to more than %d bytes", codec, limit),
			"split the disk or raise IMAGEPIPE_MAX_VIRTUAL_SIZE")
	}
	j.sha256In = hex.EncodeToString(sum.Sum())
	return verifyChecksum(obj, j.sha256In)
}

// verifyChecksum compares the sha256 of the bytes received with the one
// the uploader declared, as S3's x-amz-checksum-sha256 of a single-part
// upload or as x-amz-meta-imagepipe-sha256.
func verifyChecksum(obj objstore.Object, got string) error {
	if want := declaredSHA256(&obj); want != "" && want != got {
		return failure.Refused(events.PhaseDownload, "checksum", fmt.Errorf("checksum mismatch: the upload declares sha256 %s, the bytes received hash to %s", want, got),
			"the file was damaged in transit or the declared checksum is wrong; upload it again")
	}
	return nil
}

// maxDecompressWindow bounds the memory a compressed upload may make the
// decoder hold: the xz dictionary or zstd window its header declares. A
// header is free to claim gigabytes; 64 MiB covers xz -9 and zstd up to
// --ultra -21, and keeps a replica's memory flat.
const maxDecompressWindow = 64 << 20

func decompressor(br *bufio.Reader) (io.Reader, string, error) {
	head, _ := br.Peek(6)
	switch {
	case bytes.HasPrefix(head, magicGzip):
		zr, err := gzip.NewReader(br)
		if err != nil {
			return nil, codecGzip, fmt.Errorf("open gzip stream: %w", err)
		}
		return zr, codecGzip, nil
	case bytes.HasPrefix(head, magicXZ):
		xr, err := xz.NewReader(br, maxDecompressWindow)
		if err != nil {
			return nil, codecXZ, fmt.Errorf("open xz stream: %w", err)
		}
		return xr, codecXZ, nil
	case bytes.HasPrefix(head, magicZstd):
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
			zstd.WithDecoderMaxWindow(maxDecompressWindow), zstd.WithDecoderMaxMemory(maxDecompressWindow))
		if err != nil {
			return nil, codecZstd, fmt.Errorf("open zstd stream: %w", err)
		}
		return zr.IOReadCloser(), codecZstd, nil
	}
	return br, codecNone, nil
}

func refuseWindow(codec string) error {
	return failure.Refused(events.PhaseDownload, "decompress-window",
		fmt.Errorf("the %s stream needs more than %d MiB of memory to decompress (its dictionary or window size)", codec, maxDecompressWindow>>20),
		"compress the image again with a smaller window: xz -9 or less, zstd -19 or less without --long")
}

func windowTooLarge(err error) bool {
	return errors.Is(err, xz.ErrMemlimit) || errors.Is(err, zstd.ErrWindowSizeExceeded) || errors.Is(err, zstd.ErrDecoderSizeExceeded)
}

// compressedSuffixes are stripped from a key before its extension is
// compared with the content: disk.qcow2.xz names a qcow2.
var compressedSuffixes = map[string]string{codecGzip: ".gz", codecXZ: ".xz", codecZstd: ".zst"}

func keyForExtension(key, codec string) string {
	if sfx, ok := compressedSuffixes[codec]; ok {
		lower := strings.ToLower(key)
		if strings.HasSuffix(lower, sfx) {
			return key[:len(key)-len(sfx)]
		}
		if codec == codecZstd && strings.HasSuffix(lower, ".zstd") {
			return key[:len(key)-len(".zstd")]
		}
	}
	return key
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

// readErrs remembers the error of the object stream itself, to tell a
// dropped connection (worth a retry) from a damaged compressed stream.
type readErrs struct {
	r   io.Reader
	err error
}

func (r *readErrs) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil && err != io.EOF {
		r.err = err
	}
	return n, err
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
