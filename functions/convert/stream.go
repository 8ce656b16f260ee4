package convert

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/nbd"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/scratch"
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

// streamOutput is the destination of a raw output uploaded while qemu-img
// writes it: an NBD export on a socket, the scratch file it fills, and the
// upload and the hash that read behind it.
type streamOutput struct {
	h      *Handler
	j      *job
	tr     tracker
	d      disk
	file   fileOutput // the way the file goes if the stream must be dropped
	socket string
	st     *scratch.Stream
	// stop ends the server, the upload and the hash; stopQemu, qemu-img,
	// when the upload failed.
	stop, stopQemu context.CancelFunc
	qemuCtx        context.Context
	// wg is the upload and the hash; served closes when the server is
	// done.
	wg       sync.WaitGroup
	served   chan struct{}
	unlisten func()
	progress *laterMeter
	// Set by the upload and the hash, read once wg is done.
	obj     objstore.Object
	upErr   error
	sum     string
	hashErr error
}

// openStream serves d's output as an NBD export and starts its upload and
// its hash, which wait for qemu-img's bytes. It returns
// scratch.ErrNoSocket, having done nothing, where no socket fits.
func (h *Handler) openStream(ctx context.Context, j *job, tr tracker, d disk, file fileOutput) (*streamOutput, error) {
	socket, l, unlisten, err := scratch.Listen(j.dir)
	if errors.Is(err, scratch.ErrNoSocket) {
		return nil, err
	}
	if err != nil {
		return nil, failure.Retryable(events.PhaseConvert, fmt.Errorf("listen for qemu-img's output: %w", err), "")
	}
	st, err := scratch.CreateStream(d.output, d.virtualSize)
	if err != nil {
		unlisten()
		hint := ""
		if isNoSpace(err) {
			hint = "free space in IMAGEPIPE_SCRATCH_DIR"
		}
		return nil, failure.Retryable(events.PhaseConvert, fmt.Errorf("create the output: %w", err), hint)
	}
	s := &streamOutput{h: h, j: j, tr: tr, d: d, file: file, socket: socket, st: st,
		served: make(chan struct{}), unlisten: unlisten, progress: &laterMeter{}}
	sctx, stop := context.WithCancel(ctx)
	s.stop = stop
	// An output that cannot be stored is not worth converting further.
	s.qemuCtx, s.stopQemu = context.WithCancel(ctx)
	srv := &nbd.Server{Size: d.virtualSize, Device: st.Writer(), Log: j.log}
	go func() {
		defer close(s.served)
		if err := srv.Serve(sctx, l); err != nil {
			j.log.Warn("serving qemu-img's output stopped", "stage", events.PhaseConvert, "err", err)
		}
	}()
	guard := h.guard(j, d.outKey)
	zeros, closeZeros := h.zeroParts(j, d)
	guard.Zeros = zeros
	s.wg.Go(func() {
		defer closeZeros()
		s.obj, s.upErr = j.store.UploadGrowing(sctx, h.cfg.OutputBucket, d.outKey, st, d.virtualSize, outputMeta(j, d), s.progress, guard)
		// Only a failure of the upload's own: one that comes from the
		// stream leaves qemu-img to finish, or to fail, by itself.
		if s.upErr != nil && st.Err() == nil {
			s.stopQemu()
		}
	})
	s.wg.Go(func() { s.sum, s.hashErr = sectionSHA256(sctx, st.Section(0, d.virtualSize)) })
	return s, nil
}

func (s *streamOutput) streaming() bool { return true }

// write runs qemu-img into the export; a failed upload stops it.
func (s *streamOutput) write(ctx context.Context, onProgress func(float64)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(s.qemuCtx, cancel)()
	return s.h.qemu.ConvertToNBD(ctx, s.d.input, string(s.d.format), s.socket, onProgress)
}

// failed names the cause of a conversion that failed: qemu-img fails on a
// write the export refused, and that refusal (a full scratch disk) is the
// cause to report, not the image; and an upload that failed is why
// qemu-img was stopped.
func (s *streamOutput) failed(ctx context.Context, err error) error {
	if werr := s.st.Err(); werr != nil && !errors.Is(werr, scratch.ErrOutOfOrder) {
		err = failure.Retryable(events.PhaseConvert, werr, "free space in IMAGEPIPE_SCRATCH_DIR")
	}
	s.st.Fail(err)
	s.wg.Wait()
	// The upload fails with the stream's own failure when qemu-img
	// failed first; any other upload failure is why qemu-img stopped.
	if s.upErr != nil && ctx.Err() == nil && !errors.Is(s.upErr, s.st.Err()) {
		return classifyOutput(s.upErr)
	}
	return err
}

func (s *streamOutput) abandon(err error) { s.st.Fail(err) }

// store waits for the upload that ran behind qemu-img. If qemu-img wrote
// out of order, what was uploaded and hashed so far may not be what the
// file now holds: that is dropped, and the complete file uploaded.
func (s *streamOutput) store(ctx context.Context, d disk) (stored, error) {
	if err := s.st.Finish(); err != nil {
		s.j.log.Warn("qemu-img wrote its output out of order; uploading it after conversion instead", "stage", events.PhaseUpload, "err", err)
		s.stop()
		s.wg.Wait()
		return s.file.store(ctx, d)
	}
	s.tr.set(ctx, events.StateUploading, 0)
	s.j.log.Info("uploading", "stage", events.PhaseUpload, "output_bucket", s.h.cfg.OutputBucket, "output_key", d.outKey, "size", d.outSize)
	s.progress.start(s.tr.meter(ctx, events.PhaseUpload, events.StateUploading, d.outSize))
	s.wg.Wait()
	if s.upErr != nil {
		return stored{}, classifyOutput(s.upErr)
	}
	if s.hashErr != nil {
		return stored{}, failure.Retryable(events.PhaseUpload, s.hashErr, "")
	}
	return stored{obj: s.obj, sha256: s.sum}, nil
}

// close ends everything the stream started. Nothing reads or writes the
// stream once it is back. Every way here has finished or failed the
// stream already; failing it again only makes sure no reader waits on.
func (s *streamOutput) close() {
	s.st.Fail(errJobOver)
	s.stop()
	s.stopQemu()
	s.wg.Wait()
	<-s.served
	s.unlisten()
	s.st.Close()
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
