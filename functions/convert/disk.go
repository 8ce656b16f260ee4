package convert

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/inspect"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/sparse"
)

// convertDisk takes one inspected disk through the remaining stages:
// cross-check with qemu-img, convert, verify, upload. A raw output is
// uploaded while qemu-img still writes it, where it can be (see stream.go).
func (h *Handler) convertDisk(ctx context.Context, j *job, d *disk, rep inspect.Report) error {
	if err := h.check(ctx, j, d, rep); err != nil {
		return err
	}
	if h.streams(j, d) {
		err := h.convertStreaming(ctx, j, d, rep)
		if !errors.Is(err, errNoSocket) {
			return err
		}
		j.log.Info("scratch and temp dir paths too long for a socket; uploading after conversion", "stage", events.PhaseConvert)
	}
	for _, stage := range []func(context.Context, *job, *disk, inspect.Report) error{
		h.convert, h.verify, h.upload,
	} {
		if err := stage(ctx, j, d, rep); err != nil {
			return err
		}
	}
	return nil
}

// check holds the header's verdict against the name and against what
// qemu-img itself reports, and makes sure the output will fit.
func (h *Handler) check(ctx context.Context, j *job, d *disk, rep inspect.Report) error {
	vsize, err := Judge(ctx, h.qemu, rep, d.input, d.extKey, h.limits())
	if err != nil {
		return err
	}
	d.virtualSize = vsize
	free, err := freeSpace(j.dir)
	if err == nil && free < d.virtualSize {
		return failure.Retryable(events.PhaseInspect,
			fmt.Errorf("scratch space too small: the image needs up to %d bytes, %d are free", d.virtualSize, free),
			"free space in IMAGEPIPE_SCRATCH_DIR, lower IMAGEPIPE_MAX_CONCURRENT_JOBS, or point IMAGEPIPE_SCRATCH_DIR at a larger disk")
	}
	return nil
}

func (h *Handler) convert(ctx context.Context, j *job, d *disk, _ inspect.Report) error {
	return h.runQemu(ctx, j, d, false, func(ctx context.Context, progress func(float64)) error {
		return h.qemu.Convert(ctx, d.input, string(d.format), d.output, j.outFormat, progress)
	})
}

// runQemu runs one conversion of d under the stage's deadline, reporting
// its progress, and classifies its failure.
func (h *Handler) runQemu(ctx context.Context, j *job, d *disk, streaming bool, run func(context.Context, func(float64)) error) error {
	h.setState(ctx, j, events.StateConverting, 0)
	j.log.Info("converting", "stage", events.PhaseConvert, "format", d.format, "virtual_size", d.virtualSize, "to", j.outFormat, "member", d.member, "streaming", streaming)
	limit := h.cfg.convertTimeout(d.virtualSize)
	cctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	meter := h.newMeter(cctx, j, events.PhaseConvert, events.StateConverting, d.virtualSize)
	err := run(cctx, meter.percent)
	if err != nil {
		if ctx.Err() == nil && errors.Is(cctx.Err(), context.DeadlineExceeded) {
			return failure.Permanent(events.PhaseConvert, fmt.Errorf("qemu-img convert took longer than %s", limit),
				"raise IMAGEPIPE_CONVERT_TIMEOUT_PER_GIB if the disk is healthy and the scratch disk slow")
		}
		if isNoSpace(err) {
			return failure.Retryable(events.PhaseConvert, err, "free space in IMAGEPIPE_SCRATCH_DIR")
		}
		return classifyQemu(events.PhaseConvert, err, d.format)
	}
	return nil
}

// verify refuses to report success on an output that is not right: the
// output is re-inspected as if it were an upload, must be the target
// format referencing no other file, and a raw one must be exactly the
// virtual size.
func (h *Handler) verify(ctx context.Context, j *job, d *disk, _ inspect.Report) error {
	j.log.Info("verifying", "stage", events.PhaseVerify, "member", d.member)
	st, err := os.Stat(d.output)
	if err != nil {
		return failure.Retryable(events.PhaseVerify, fmt.Errorf("output missing after conversion: %w", err), "")
	}
	d.outSize = st.Size()
	if j.outFormat == "raw" && d.outSize != d.virtualSize {
		return failure.Permanent(events.PhaseVerify, fmt.Errorf("raw output is %d bytes, the image's virtual size is %d", d.outSize, d.virtualSize), "")
	}
	if j.outFormat == "qcow2" {
		rep, err := inspect.InspectFile(d.output, h.limits())
		if err != nil || rep.Format != inspect.Qcow2 {
			return failure.Permanent(events.PhaseVerify, fmt.Errorf("output failed re-inspection (format %q): %v", rep.Format, err), "")
		}
		info, err := h.qemu.Info(ctx, d.output, "qcow2")
		if err != nil {
			return failure.Permanent(events.PhaseVerify, fmt.Errorf("output failed re-inspection: %w", err), "")
		}
		vsize, err := inspect.CheckQemuInfo(rep, info.JSON, d.output, h.limits())
		if err != nil {
			return failure.Permanent(events.PhaseVerify, fmt.Errorf("output failed re-inspection: %w", err), "")
		}
		if vsize != d.virtualSize {
			return failure.Permanent(events.PhaseVerify, fmt.Errorf("qcow2 output has virtual size %d, the input %d", vsize, d.virtualSize), "")
		}
	}
	return nil
}

// upload sends the output and hashes it at the same time: on a large image
// both take seconds, and neither needs the other until the end.
func (h *Handler) upload(ctx context.Context, j *job, d *disk, _ inspect.Report) error {
	return h.uploadGuarded(ctx, j, d, h.guard(j, d.outKey))
}

// uploadGuarded is upload with the check that runs just before the output
// is completed; an OVA's disks wait there for one another.
func (h *Handler) uploadGuarded(ctx context.Context, j *job, d *disk, guard objstore.Guard) error {
	h.setState(ctx, j, events.StateUploading, 0)
	j.log.Info("uploading", "stage", events.PhaseUpload, "output_bucket", h.cfg.OutputBucket, "output_key", d.outKey, "size", d.outSize)
	// One open file serves both: its holes are mapped once, and the
	// hash and the parts share its read windows.
	f, err := sparse.Open(d.output)
	if err != nil {
		return failure.Retryable(events.PhaseUpload, fmt.Errorf("open the output: %w", err), "")
	}
	defer f.Close()
	hctx, stopHash := context.WithCancel(ctx)
	defer stopHash()
	type hashed struct {
		sum string
		err error
	}
	sumc := make(chan hashed, 1)
	go func() {
		sum, err := sectionSHA256(hctx, f.Section(0, f.Size()))
		sumc <- hashed{sum, err}
	}()

	// Uploading to the same key on a redelivery replaces the object whole:
	// S3 never exposes a half-written one, so a retry cannot corrupt it.
	meter := h.newMeter(ctx, j, events.PhaseUpload, events.StateUploading, d.outSize)
	obj, err := h.store.Upload(ctx, h.cfg.OutputBucket, d.outKey, f, outputMeta(j, d), meter, guard)
	if err != nil {
		stopHash()
		<-sumc
		return classifyOutput(err)
	}
	hs := <-sumc
	if hs.err != nil {
		return failure.Retryable(events.PhaseUpload, hs.err, "")
	}
	return h.uploaded(ctx, j, d, obj, hs.sum)
}

// uploaded finishes an upload: the hash is tagged on the object last, so
// an output without it is one whose upload may not have finished; the
// scratch copies are no longer needed, and an OVA's next disk may need
// the room. The tag goes only on this job's own output, and only while
// its input is still the version converted: a newer version's job may
// have written the key since.
func (h *Handler) uploaded(ctx context.Context, j *job, d *disk, obj objstore.Object, sum string) error {
	d.sha256 = sum
	if err := h.stillOurs(ctx, j, obj); err != nil {
		return err
	}
	if err := h.store.SetTags(ctx, h.cfg.OutputBucket, d.outKey, obj.VersionID, outputTags(d)); err != nil {
		return classifyWrite(err)
	}
	_ = os.Remove(d.output)
	if d.input != j.input {
		_ = os.Remove(d.input)
	}
	return nil
}

// guard is what every write of the job's outputs checks just before it
// completes: that the input is still the version the job converted.
//
// The upload's id is noted in the job's scratch dir, for the sweep that
// follows a process's death.
func (h *Handler) guard(j *job, key string) objstore.Guard {
	g := objstore.Guard{Check: func(ctx context.Context) error { return h.stillCurrent(ctx, j) }}
	// The guard is made just before the write: noted now, the upload the
	// write is about to start can be found even if the process dies before
	// its id is known.
	if err := noteUpload(j.dir, notedUpload{Bucket: h.cfg.OutputBucket, Key: key, Since: h.now()}); err != nil {
		j.log.Warn("upload not noted in scratch; if this process dies, the server's expiry of stale uploads removes it", "output_key", key, "err", err)
	}
	g.Started = func(uploadID string) {
		if err := noteUpload(j.dir, notedUpload{Bucket: h.cfg.OutputBucket, Key: key, UploadID: uploadID}); err != nil {
			j.log.Warn("upload not noted in scratch; if this process dies, the server's expiry of stale uploads removes it", "output_key", key, "err", err)
		}
	}
	return g
}

// stillCurrent returns errSuperseded when the input is no longer the
// version and content the job was queued for: it was overwritten or
// deleted, and its newer version, if any, has a job of its own whose
// output must not be replaced by this one's. A job without a version id
// or ETag (none queued by ingest lacks both) has nothing to compare.
func (h *Handler) stillCurrent(ctx context.Context, j *job) error {
	if j.VersionID == "" && j.ETag == "" {
		return nil
	}
	cur, err := h.store.Stat(ctx, j.Bucket, j.Key)
	switch {
	case objstore.IsNotFound(err):
		return errSuperseded
	case err != nil:
		return fmt.Errorf("check the upload is still the version converted: %w", err)
	case j.VersionID != "" && cur.VersionID != j.VersionID, j.ETag != "" && cur.ETag != j.ETag:
		return errSuperseded
	}
	return nil
}

// stillOurs checks, before the job marks obj complete, that obj is still
// what the output key holds and the input is still the job's version.
func (h *Handler) stillOurs(ctx context.Context, j *job, obj objstore.Object) error {
	if err := h.stillCurrent(ctx, j); err != nil {
		return classifyOutput(err)
	}
	cur, err := h.store.Stat(ctx, obj.Bucket, obj.Key)
	if objstore.IsNotFound(err) {
		return errSuperseded
	}
	if err != nil {
		return classifyWrite(err)
	}
	if cur.Metadata[MetaJob] != j.JobID || cur.ETag != obj.ETag {
		return errSuperseded
	}
	return nil
}

// handBack runs when a job ends superseded. Its own state updates may
// have replaced the record of the newer version's job, which `imagepipe
// status` and `upload` follow; when that job's output is already complete
// (made from the input as it is now, and tagged), its READY is written
// back. A newer job still running writes its own states soon enough.
func (h *Handler) handBack(ctx context.Context, j *job) {
	if st, err := h.report.Get(ctx, j.Bucket, j.Key); err != nil || st.JobID != j.JobID {
		return
	}
	in, err := h.store.Stat(ctx, j.Bucket, j.Key)
	if err != nil {
		return
	}
	key := events.OutputKey(h.cfg.OutputPrefix, j.Key, j.outFormat)
	out, err := h.store.Stat(ctx, h.cfg.OutputBucket, key)
	if err != nil || out.Metadata[MetaJob] == "" || out.Metadata[MetaSourceETag] != in.ETag ||
		out.Metadata[MetaSourceVersion] != in.VersionID || h.outputSHA256(ctx, out) == "" {
		return
	}
	st := events.Status{
		Bucket: j.Bucket, Key: j.Key, JobID: out.Metadata[MetaJob], State: events.StateReady, Percent: 100,
		InputFormat: out.Metadata[MetaInput], OutputBucket: h.cfg.OutputBucket, OutputKey: key, UpdatedAt: h.now().UTC(),
	}
	if err := h.report.Set(ctx, st); err != nil {
		j.log.Warn("status of the newer version not restored", "err", err)
	}
}

// classifyOutput decides on a failed write of an output: vetoed because
// the input changed is the quiet end of a superseded job; losing to other
// writers every time may pass later; anything else as classifyWrite.
func classifyOutput(err error) error {
	switch {
	case errors.Is(err, errSuperseded):
		return errSuperseded
	case errors.Is(err, objstore.ErrContended):
		return failure.Retryable(events.PhaseUpload, err, "")
	}
	return classifyWrite(err)
}

func sectionSHA256(ctx context.Context, r *sparse.Section) (string, error) {
	hsh := sha256.New()
	if _, err := io.Copy(ctxWriter{ctx, hsh}, r); err != nil {
		return "", fmt.Errorf("hash the output: %w", err)
	}
	return hex.EncodeToString(hsh.Sum(nil)), nil
}

// ctxWriter stops a copy once its context is done.
type ctxWriter struct {
	ctx context.Context
	w   io.Writer
}

func (c ctxWriter) Write(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.w.Write(p)
}
