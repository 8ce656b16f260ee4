package decompress

import (
	"bytes"
	"fmt"
	"os"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/scratch"
)

const (
	// holeBlock is the unit of holes: an aligned block of this many zero
	// bytes is skipped, not written. It is a multiple of every file
	// system's block size, so a skipped block is a real hole.
	holeBlock = 64 << 10
	// bufSize is how much is read before it is written: large enough for
	// the disk to stream, small enough to keep a job's memory flat.
	bufSize = 4 << 20
)

var zeroBlock [holeBlock]byte

// holeWriter writes a new file sequentially, leaving each aligned block of
// zeros as a hole and the rest with O_DIRECT where the file system allows
// it (see package scratch). Every block it writes is first taken from its
// room.
type holeWriter struct {
	path string
	f    *scratch.WriterAt
	mem  []byte // from scratch.AlignedBuffer: page aligned, as O_DIRECT asks
	buf  []byte // a bufSize view of mem that callers fill; nil once closed
	size int64  // bytes of content written, holes included
	room *room
}

func createHoleWriter(path string, r *room) (*holeWriter, error) {
	f, err := scratch.CreateWriterAt(path, 0)
	if err != nil {
		return nil, err
	}
	mem, err := scratch.AlignedBuffer(bufSize)
	if err != nil {
		f.Close()
		os.Remove(path)
		return nil, fmt.Errorf("buffer: %w", err)
	}
	return &holeWriter{path: path, f: f, mem: mem, buf: mem, room: r}, nil
}

// write appends p, which is w.buf or a prefix of it: each run of blocks
// that are not all zeros is written in one call, at an offset and from an
// address aligned to holeBlock.
func (w *holeWriter) write(p []byte) error {
	start := -1 // of the run of data blocks being gathered
	for off := 0; off < len(p); off += holeBlock {
		end := min(off+holeBlock, len(p))
		if !bytes.Equal(p[off:end], zeroBlock[:end-off]) {
			if start < 0 {
				start = off
			}
			continue
		}
		if start >= 0 {
			if err := w.writeRun(p[start:off], w.size+int64(start)); err != nil {
				return err
			}
			start = -1
		}
	}
	if start >= 0 {
		if err := w.writeRun(p[start:], w.size+int64(start)); err != nil {
			return err
		}
	}
	w.size += int64(len(p))
	return nil
}

func (w *holeWriter) writeRun(run []byte, at int64) error {
	if len(run) == 0 {
		return nil
	}
	write, err := w.room.take(int64(len(run)), at+int64(len(run)))
	if err != nil || !write {
		return err
	}
	if _, err := w.f.WriteAt(run, at); err != nil {
		return writeFailure(err)
	}
	return nil
}

// Close closes the file and sets its size, which a trailing hole leaves
// short.
func (w *holeWriter) Close() error {
	if w.buf == nil {
		return os.ErrClosed
	}
	w.buf = nil
	err := w.f.Close()
	if err == nil {
		err = os.Truncate(w.path, w.size)
	}
	if uerr := scratch.FreeBuffer(w.mem); err == nil {
		err = uerr
	}
	return err
}

// recheckEvery is how many bytes are written between two looks at the
// free space: other jobs write to the same disk meanwhile, so a look only
// vouches for a little while. It is far below any sensible reserve.
const recheckEvery = 64 << 20

// room is the part of the scratch file system one expansion may fill:
// what is free beyond the reserve, looked at again every recheckEvery
// bytes.
type room struct {
	b       Budget
	dir     string
	used    int64 // bytes allocated so far
	avail   int64 // free beyond the reserve at the last look
	limit   int64 // used may grow to this before the next look
	size    int64 // of the file system, at the last look
	reserve int64
	// need counts, once the content has run short of room, the bytes it
	// would take in all; short is then set.
	need  int64
	short bool
}

func newRoom(b Budget, dir string) *room {
	if b.free == nil {
		b.free = freeSpace
	}
	return &room{b: b, dir: dir}
}

// take allocates n bytes of room, looking at the free space again when
// the last look does not cover them. content is how far the content has
// got, for the refusal's message.
//
// Content that runs short of room is not judged there and then: whether
// it could ever fit is the question, since what does not fit the whole
// scratch file system beyond the reserve never will, and is refused,
// while what fits an emptier disk passes once other jobs end, and is
// retried (see shortage). So from then on take says not to write, and
// only counts, until the content outgrows the whole file system or ends.
func (r *room) take(n, content int64) (write bool, err error) {
	if !r.short && r.used+n > r.limit {
		if err := r.look(); err != nil {
			return false, err
		}
		if r.used+n > r.limit {
			r.short, r.need = true, r.used
		}
	}
	if !r.short {
		r.used += n
		return true, nil
	}
	r.need += n
	if r.need > r.size-r.reserve {
		return false, failure.Refused(phase, events.RuleScratchSpace,
			fmt.Errorf("the content needs more than %d bytes of scratch space by byte %d (runs of zeros take none); the whole scratch file system holds %d beyond its reserve of %d bytes (IMAGEPIPE_SCRATCH_RESERVE)",
				r.size-r.reserve, content, r.size-r.reserve, r.reserve),
			"point IMAGEPIPE_SCRATCH_DIR at a larger disk, then convert the upload again; an upload this large once expanded may also be a decompression bomb")
	}
	return false, nil
}

// shortage is the failure of content that ran short of room but would
// fit the scratch file system were it emptier, or nil if it never ran
// short.
func (r *room) shortage() error {
	if !r.short {
		return nil
	}
	return &failure.Error{Phase: phase, Rule: events.RuleScratchSpace,
		Err: fmt.Errorf("the content needs %d bytes of scratch space (runs of zeros take none); the scratch disk had room for %d beyond its reserve of %d bytes (IMAGEPIPE_SCRATCH_RESERVE), and holds %d once what else is on it is gone",
			r.need, r.used+max(r.avail, 0), r.reserve, r.size-r.reserve),
		Suggestion: "it is retried once other jobs end; lower IMAGEPIPE_MAX_CONCURRENT_JOBS or enlarge IMAGEPIPE_SCRATCH_DIR to avoid the wait"}
}

func (r *room) look() error {
	free, size, err := r.b.free(r.dir)
	if err != nil {
		return failure.Retryable(phase, fmt.Errorf("measure free scratch space: %w", err), "check IMAGEPIPE_SCRATCH_DIR")
	}
	r.size, r.reserve = size, r.b.Reserve
	if r.reserve < 0 {
		r.reserve = AutoReserve(size)
	}
	r.avail = free - r.reserve
	every := r.b.recheckEvery
	if every == 0 {
		every = recheckEvery
	}
	r.limit = r.used + min(max(r.avail, 0), every)
	return nil
}

// AutoReserve is the reserve of a file system of size bytes when none is
// configured: a twentieth of it, at most 1 GiB, so that a small scratch
// disk is not all reserve.
func AutoReserve(size int64) int64 { return min(size/20, 1<<30) }
