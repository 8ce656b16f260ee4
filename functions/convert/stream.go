package convert

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/inspect"
	"github.com/imagepipe/imagepipe/internal/nbd"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/sparse"
)

// A raw output is uploaded while qemu-img still writes it. qemu-img
// writes into an NBD export that convert serves on a socket in the job's
// scratch dir; the export stores each write in the scratch file, and the
// hash and the upload read behind qemu-img, each part sent as soon as its
// bytes are final. On a large image the upload, the longest stage, then
// starts seconds earlier, and the hash is done by the time qemu-img is.
//
// The output still goes to the scratch file whole: if qemu-img ever wrote
// out of order, what was read behind it is dropped and the file is
// uploaded the ordinary way once qemu-img is done.

// errJobOver ends whatever still reads the output when its job returns.
var errJobOver = errors.New("the job is over")

// maxSocketPath is what fits in a Unix socket address, with its NUL.
const maxSocketPath = 107

// streams reports whether d's output can be uploaded while it converts.
func (h *Handler) streams(j *job, d *disk) bool {
	// A qcow2 output is written out of order (tables after data); an
	// export's size is whole sectors; and an output of one part gains
	// nothing, its only part being also the last, which waits for qemu-img
	// to finish.
	return h.cfg.StreamOutput && j.outFormat == "raw" && d.virtualSize > h.streamAbove && d.virtualSize%512 == 0
}

// listen opens the socket qemu-img writes to: in the job's scratch dir,
// or where the scratch path is too long for a socket address, in a
// private directory of the OS temp dir. Either is the job's own, so no
// other user can reach the export. It returns errNoSocket where neither
// fits. done closes the socket and removes what it made.
func listen(j *job) (socket string, l net.Listener, done func(), err error) {
	dir, cleanup := j.dir, func() {}
	if len(filepath.Join(dir, socketName)) > maxSocketPath {
		// MkdirTemp appends at most 10 digits.
		if len(filepath.Join(os.TempDir(), tempSocketDir+"0123456789", socketName)) > maxSocketPath {
			return "", nil, nil, errNoSocket
		}
		if dir, err = os.MkdirTemp("", tempSocketDir); err != nil {
			return "", nil, nil, err
		}
		cleanup = func() { os.RemoveAll(dir) }
		// Noted in the job's dir, so that the sweep of a job whose process
		// died removes this one too.
		if err := os.WriteFile(filepath.Join(j.dir, socketDirNote), []byte(dir), 0o600); err != nil {
			cleanup()
			return "", nil, nil, err
		}
	}
	socket = filepath.Join(dir, socketName)
	if l, err = net.Listen("unix", socket); err != nil {
		cleanup()
		return "", nil, nil, err
	}
	return socket, l, func() { l.Close(); cleanup() }, nil
}

var errNoSocket = errors.New("no directory with a path short enough for a socket")

const (
	tempSocketDir = "imagepipe-nbd-"
	socketDirNote = "socket-dir"
)

// removeSocketDir removes the socket directory a job noted in jobDir, if
// it is one listen made.
func removeSocketDir(jobDir string) {
	b, err := os.ReadFile(filepath.Join(jobDir, socketDirNote))
	if err != nil {
		return
	}
	dir := filepath.Clean(string(b))
	if filepath.Dir(dir) == filepath.Clean(os.TempDir()) && strings.HasPrefix(filepath.Base(dir), tempSocketDir) {
		os.RemoveAll(dir)
	}
}

const socketName = "output.sock"

// convertStreaming converts d into an NBD export and uploads it at the
// same time. It returns errNoSocket, having done nothing, where no socket
// fits.
func (h *Handler) convertStreaming(ctx context.Context, j *job, d *disk, rep inspect.Report) error {
	socket, l, unlisten, err := listen(j)
	if errors.Is(err, errNoSocket) {
		return err
	}
	if err != nil {
		return failure.Retryable(events.PhaseConvert, fmt.Errorf("listen for qemu-img's output: %w", err), "")
	}
	st, err := sparse.CreateStream(d.output, d.virtualSize)
	if err != nil {
		unlisten()
		hint := ""
		if isNoSpace(err) {
			hint = "free space in IMAGEPIPE_SCRATCH_DIR"
		}
		return failure.Retryable(events.PhaseConvert, fmt.Errorf("create the output: %w", err), hint)
	}
	sctx, stop := context.WithCancel(ctx)
	// wg is the upload and the hash; the server runs until stop.
	var wg sync.WaitGroup
	served := make(chan struct{})
	defer func() {
		// Nothing reads or writes the stream once these are back. Every
		// way here has finished or failed the stream already; failing it
		// again only makes sure no reader waits on.
		st.Fail(errJobOver)
		stop()
		wg.Wait()
		<-served
		unlisten()
		st.Close()
	}()
	srv := &nbd.Server{Size: d.virtualSize, Device: st.Writer(), Log: j.log}
	go func() {
		defer close(served)
		if err := srv.Serve(sctx, l); err != nil {
			j.log.Warn("serving qemu-img's output stopped", "stage", events.PhaseConvert, "err", err)
		}
	}()
	// An output that cannot be stored is not worth converting further.
	qctx, stopQemu := context.WithCancel(ctx)
	defer stopQemu()
	progress := &laterMeter{}
	var obj objstore.Object
	var upErr error
	wg.Go(func() {
		obj, upErr = h.store.UploadGrowing(sctx, h.cfg.OutputBucket, d.outKey, st, d.virtualSize, outputMeta(j, d), progress, h.guard(j, d.outKey))
		// Only a failure of the upload's own: one that comes from the
		// stream leaves qemu-img to finish, or to fail, by itself.
		if upErr != nil && st.Err() == nil {
			stopQemu()
		}
	})
	var sum string
	var hashErr error
	wg.Go(func() { sum, hashErr = sectionSHA256(sctx, st.Section(0, d.virtualSize)) })

	err = h.runQemu(qctx, j, d, true, func(ctx context.Context, onProgress func(float64)) error {
		return h.qemu.ConvertToNBD(ctx, d.input, string(d.format), socket, onProgress)
	})
	if err != nil {
		// qemu-img fails on a write the export refused; that refusal (a
		// full scratch disk) is the cause to report, not the image.
		if werr := st.Err(); werr != nil && !errors.Is(werr, sparse.ErrOutOfOrder) {
			err = failure.Retryable(events.PhaseConvert, werr, "free space in IMAGEPIPE_SCRATCH_DIR")
		}
		st.Fail(err)
		wg.Wait()
		// The upload fails with the stream's own failure when qemu-img
		// failed first; any other upload failure is why qemu-img stopped.
		if upErr != nil && ctx.Err() == nil && !errors.Is(upErr, st.Err()) {
			return classifyOutput(upErr)
		}
		return err
	}
	if err := h.verify(ctx, j, d, rep); err != nil {
		st.Fail(err)
		return err
	}
	if err := st.Finish(); err != nil {
		// What was uploaded and hashed so far may not be what the file now
		// holds: drop it, and upload the complete file.
		j.log.Warn("qemu-img wrote its output out of order; uploading it after conversion instead", "stage", events.PhaseUpload, "err", err)
		stop()
		wg.Wait()
		return h.upload(ctx, j, d, rep)
	}
	h.setState(ctx, j, events.StateUploading, 0)
	j.log.Info("uploading", "stage", events.PhaseUpload, "output_bucket", h.cfg.OutputBucket, "output_key", d.outKey, "size", d.outSize)
	progress.start(h.newMeter(ctx, j, events.PhaseUpload, events.StateUploading, d.outSize))
	wg.Wait()
	if upErr != nil {
		return classifyOutput(upErr)
	}
	if hashErr != nil {
		return failure.Retryable(events.PhaseUpload, hashErr, "")
	}
	return h.uploaded(ctx, j, d, obj, sum)
}

// laterMeter counts the bytes an upload sends from its start but reports
// them only from the UPLOADING state on: while qemu-img converts, the
// job's progress is qemu-img's.
type laterMeter struct {
	mu   sync.Mutex
	sent int64
	m    *meter
}

func (l *laterMeter) Read(p []byte) (int, error) {
	l.mu.Lock()
	l.sent += int64(len(p))
	m := l.m
	l.mu.Unlock()
	if m != nil {
		m.add(int64(len(p)))
	}
	return len(p), nil
}

func (l *laterMeter) start(m *meter) {
	l.mu.Lock()
	defer l.mu.Unlock()
	m.done = l.sent
	l.m = m
}
