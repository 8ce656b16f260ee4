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
	obj, err := h.store.Upload(ctx, h.cfg.OutputBucket, d.outKey, f, outputMeta(j, d), meter)
	if err != nil {
		stopHash()
		<-sumc
		return classifyWrite(err)
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
// the room.
func (h *Handler) uploaded(ctx context.Context, j *job, d *disk, obj objstore.Object, sum string) error {
	d.sha256 = sum
	if err := h.store.SetTags(ctx, h.cfg.OutputBucket, d.outKey, obj.VersionID, outputTags(d)); err != nil {
		return classifyWrite(err)
	}
	_ = os.Remove(d.output)
	if d.input != j.input {
		_ = os.Remove(d.input)
	}
	return nil
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
