package decompress

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
)

// Budget bounds what Expand may write.
type Budget struct {
	// MaxSize is the most bytes the content may have, zeros included
	// (IMAGEPIPE_MAX_VIRTUAL_SIZE); 0 means no limit.
	MaxSize int64
	// Reserve is how many bytes of the scratch file system are left free
	// for everything else (IMAGEPIPE_SCRATCH_RESERVE); below 0 it is
	// AutoReserve of the file system.
	Reserve int64

	// free reports the free bytes and the size of the file system holding
	// dir; nil asks the kernel. recheckEvery, when not 0, replaces the
	// constant. Tests set them.
	free         func(dir string) (free, size int64, err error)
	recheckEvery int64
}

// Result is what Expand wrote.
type Result struct {
	Codec Codec
	// Size is the content's length, zeros included: the file's size.
	Size int64
	// Allocated is the bytes written to disk; blocks of zeros are holes.
	Allocated int64
}

// phase is the stage of a job whose failures Expand decides.
const phase = events.PhaseDownload

// Expand writes the content of r, decompressed if it is gzip, xz or
// zstd, to a new file at path, within b. Blocks of zeros become holes.
//
// Its error is a failure.Error where the outcome is decided: a refusal
// naming one of the rules above, or a retryable shortage of scratch space
// that other jobs caused. An error reading r itself is returned wrapped
// but unclassified: the caller knows what its source's errors mean. On
// any error the file is removed.
func Expand(ctx context.Context, r io.Reader, path string, b Budget) (Result, error) {
	src := &source{r: r}
	dec, codec, err := newReader(bufio.NewReaderSize(src, 1<<20))
	res := Result{Codec: codec}
	if err != nil {
		return res, src.blame(ctx, err)
	}
	defer dec.Close()
	w, err := createHoleWriter(path, newRoom(b, filepath.Dir(path)))
	if err != nil {
		return res, failure.Retryable(phase, fmt.Errorf("create scratch file: %w", err), "check IMAGEPIPE_SCRATCH_DIR exists and is writable")
	}
	err = fill(ctx, w, dec, codec, b.MaxSize)
	if err == nil {
		err = w.room.shortage()
	}
	if cerr := w.Close(); err == nil && cerr != nil {
		err = writeFailure(cerr)
	}
	res.Size, res.Allocated = w.size, w.room.used
	if err != nil {
		os.Remove(path)
		return res, src.blame(ctx, err)
	}
	return res, nil
}

// fill copies dec to w a buffer at a time, refusing content past maxSize
// before it is written.
func fill(ctx context.Context, w *holeWriter, dec io.Reader, codec Codec, maxSize int64) error {
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, rerr := readFull(dec, w.buf)
		if maxSize > 0 && w.size+int64(n) > maxSize {
			return tooLarge(codec, maxSize)
		}
		if err := w.write(w.buf[:n]); err != nil {
			return err
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return &decodeErr{codec, rerr}
		}
	}
}

// readFull reads until p is full or r fails; unlike io.ReadFull it
// passes r's own error through, so that a decoder's io.ErrUnexpectedEOF
// (a truncated stream) is not mistaken for the end of the content.
func readFull(r io.Reader, p []byte) (int, error) {
	n := 0
	for n < len(p) {
		m, err := r.Read(p[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func tooLarge(codec Codec, maxSize int64) error {
	what := "the upload is"
	if codec != None {
		what = fmt.Sprintf("the %s stream expands to", codec)
	}
	return failure.Refused(phase, events.RuleVirtualSize, fmt.Errorf("%s more than %d bytes, the most IMAGEPIPE_MAX_VIRTUAL_SIZE allows", what, maxSize),
		"split the disk or raise IMAGEPIPE_MAX_VIRTUAL_SIZE")
}

// source remembers the error of the stream being expanded, to tell a
// dropped connection from a damaged compressed stream.
type source struct {
	r   io.Reader
	err error
}

func (s *source) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	if err != nil && err != io.EOF {
		s.err = err
	}
	return n, err
}

// blame decides whose fault err is: a decision already made stands; a
// cancelled context or a failing source is the caller's to classify;
// what remains is the decoder's verdict on the stream.
func (s *source) blame(ctx context.Context, err error) error {
	if _, ok := failure.As(err); ok {
		return err
	}
	if ctx.Err() != nil {
		return fmt.Errorf("expand: %w", err)
	}
	if s.err != nil {
		return fmt.Errorf("read: %w", s.err)
	}
	var de *decodeErr
	if errors.As(err, &de) && de.codec != None {
		return decodeError(de.codec, de.err)
	}
	return err
}

// decodeErr is a decoder's error before it is known not to come from
// the source.
type decodeErr struct {
	codec Codec
	err   error
}

func (e *decodeErr) Error() string { return e.err.Error() }
func (e *decodeErr) Unwrap() error { return e.err }

// decodeError is the verdict on a stream its decoder gave up on.
func decodeError(codec Codec, err error) error {
	if windowTooLarge(err) {
		return failure.Refused(phase, events.RuleDecompressWindow,
			fmt.Errorf("the %s stream needs more than %d MiB of memory to decompress (its dictionary or window size)", codec, MaxWindow>>20),
			"compress the image again with a smaller window: xz -9 or less, zstd -19 or less without --long")
	}
	return failure.Refused(phase, events.RuleCompressedStream, fmt.Errorf("decompress %s stream: %w", codec, err),
		"upload the file again; its compressed stream is damaged or truncated")
}

// writeFailure classifies a failed write to scratch. Every write was
// within the budget last measured, so a full disk means something else
// took the room meanwhile: that passes.
func writeFailure(err error) error {
	if errors.Is(err, syscall.ENOSPC) {
		return &failure.Error{Phase: phase, Rule: events.RuleScratchSpace, Err: fmt.Errorf("scratch space filled up by other writers while expanding: %w", err),
			Suggestion: "free space in IMAGEPIPE_SCRATCH_DIR, lower IMAGEPIPE_MAX_CONCURRENT_JOBS or raise IMAGEPIPE_SCRATCH_RESERVE"}
	}
	return failure.Retryable(phase, fmt.Errorf("write scratch file: %w", err), "")
}
