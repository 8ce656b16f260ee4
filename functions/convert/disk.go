package convert

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/inspect"
	"github.com/imagepipe/imagepipe/internal/scratch"
)

// convertDisk takes one inspected disk through the remaining stages:
// check, convert into its destination, verify, store, mark complete.
func (h *Handler) convertDisk(ctx context.Context, j *job, tr tracker, d disk, rep inspect.Report) (disk, error) {
	vsize, err := h.check(ctx, j, d, rep)
	if err != nil {
		return d, err
	}
	d.virtualSize = vsize
	dest, err := h.destination(ctx, j, tr, d)
	if err != nil {
		return d, err
	}
	defer dest.close()
	if err := h.convert(ctx, j, tr, d, dest); err != nil {
		return d, err
	}
	if d.outSize, err = h.verify(ctx, j, d); err != nil {
		dest.abandon(err)
		return d, err
	}
	st, err := dest.store(ctx, d)
	if err != nil {
		return d, err
	}
	return h.complete(ctx, j, d, st)
}

// destination is where qemu-img writes a disk's output and how the output
// reaches the output bucket: a file uploaded once it is verified
// (upload.go), or an NBD export uploaded while qemu-img writes it
// (stream.go).
type destination interface {
	// write runs qemu-img into the destination.
	write(ctx context.Context, onProgress func(percent float64)) error
	// streaming reports whether the output is uploaded as it is written.
	streaming() bool
	// failed is what to report when write failed with err.
	failed(ctx context.Context, err error) error
	// abandon drops an output that failed verification with err.
	abandon(err error)
	// store uploads the verified output d.
	store(ctx context.Context, d disk) (stored, error)
	// close releases what the destination holds.
	close()
}

// destination chooses, before qemu-img starts, where d's output goes: a
// raw output is uploaded while it converts where it can be (see
// stream.go), anything else once it is complete.
func (h *Handler) destination(ctx context.Context, j *job, tr tracker, d disk) (destination, error) {
	file := fileOutput{h: h, j: j, tr: tr, d: d}
	if !h.streams(j, d) {
		return file, nil
	}
	s, err := h.openStream(ctx, j, tr, d, file)
	if errors.Is(err, scratch.ErrNoSocket) {
		j.log.Info("scratch and temp dir paths too long for a socket; uploading after conversion", "stage", events.PhaseConvert)
		return file, nil
	}
	if err != nil {
		return nil, err
	}
	return s, nil
}

// streams reports whether d's output can be uploaded while it converts.
func (h *Handler) streams(j *job, d disk) bool {
	// A qcow2 output is written out of order (tables after data); an
	// export's size is whole sectors; and an output of one part gains
	// nothing, its only part being also the last, which waits for qemu-img
	// to finish.
	return h.cfg.StreamOutput && j.outFormat == "raw" && d.virtualSize > h.streamAbove && d.virtualSize%512 == 0
}

// check holds the header's verdict against the name and against what
// qemu-img itself reports, and makes sure the output will fit. It returns
// the disk's virtual size.
func (h *Handler) check(ctx context.Context, j *job, d disk, rep inspect.Report) (int64, error) {
	vsize, err := Judge(ctx, h.qemu, rep, d.input, d.extKey, h.limits())
	if err != nil {
		return 0, err
	}
	if err := h.makeRoom(ctx, j, d, rep, vsize); err != nil {
		return 0, err
	}
	return vsize, nil
}

// makeRoom makes sure the disk's output will fit the scratch file system.
// The output's data is at most the disk's virtual size, which costs
// nothing to ask; a disk larger than what is free is measured, since its
// output holds only what the disk holds (a thin 2 TiB disk with 20 GiB in
// it needs 20 GiB). qemu-img measure counts every guest cluster the image
// says holds data, so a hostile image that points many clusters at the
// same bytes is counted in full; where its driver cannot tell (VHDX), the
// inspector counts the blocks the image's own table marks present, in the
// same way.
//
// An output that needs more than the whole file system can never fit,
// however long it waits; one that needs more than is free now waits for
// other jobs to finish.
func (h *Handler) makeRoom(ctx context.Context, j *job, d disk, rep inspect.Report, vsize int64) error {
	free, total, err := h.diskSpace(j.dir)
	if err != nil || vsize <= free {
		return nil
	}
	measured, err := h.qemu.Measure(ctx, d.input, string(rep.Format))
	if err != nil {
		return classifyQemu(events.PhaseInspect, err, rep.Format)
	}
	need := outputNeed(j.outFormat, vsize, measured, storedData(d.input, rep))
	switch {
	case need > total:
		return failure.Refused(events.PhaseInspect, events.RuleScratchSpace,
			fmt.Errorf("the image's output needs up to %d bytes of scratch space (virtual size %d; runs of zeros take none), more than the whole scratch file system (%d bytes)", need, vsize, total),
			"point IMAGEPIPE_SCRATCH_DIR at a larger disk, or set IMAGEPIPE_MAX_VIRTUAL_SIZE to what it holds so that such images are refused at once")
	case need > free:
		return failure.Retryable(events.PhaseInspect,
			fmt.Errorf("scratch space too small: the image's output needs up to %d bytes, %d are free", need, free),
			"free space in IMAGEPIPE_SCRATCH_DIR, lower IMAGEPIPE_MAX_CONCURRENT_JOBS, or point IMAGEPIPE_SCRATCH_DIR at a larger disk")
	}
	j.log.Info("disk larger than the free scratch space; its data fits", "virtual_size", vsize, "need", need, "free", free)
	return nil
}

// rawFirstBlock is what a raw output takes beyond its data: qemu-img
// allocates the first block of every raw file it creates, to learn the
// file system's alignment.
const rawFirstBlock = 64 << 10

// outputNeed bounds the scratch space a disk's output takes, from what
// qemu-img measure said a qcow2 output needs (its data and its tables)
// and, where the inspector knows it (stored >= 0), the data the disk
// stores.
func outputNeed(outFormat string, vsize, measured, stored int64) int64 {
	if outFormat == "raw" {
		need := min(measured, vsize+rawFirstBlock)
		if stored >= 0 {
			need = min(need, stored+rawFirstBlock)
		}
		return need
	}
	// qcow2's tables for the data stored are at most those for the whole
	// disk, which is what measure added to a disk it sees as all data.
	if stored >= 0 {
		return min(measured, stored+max(measured-vsize, 0))
	}
	return measured
}

// storedData is the data the disk at path stores as the inspector counts
// it, or -1 where qemu-img measure is the better judge.
func storedData(path string, rep inspect.Report) int64 {
	f, err := os.Open(path)
	if err != nil {
		return -1
	}
	defer f.Close()
	if n, ok := inspect.StoredData(rep, f); ok {
		return n
	}
	return -1
}

// convert runs qemu-img on d into dest under the stage's deadline,
// reporting its progress, and classifies its failure.
func (h *Handler) convert(ctx context.Context, j *job, tr tracker, d disk, dest destination) error {
	tr.set(ctx, events.StateConverting, 0)
	j.log.Info("converting", "stage", events.PhaseConvert, "format", d.format, "virtual_size", d.virtualSize, "to", j.outFormat, "member", d.member, "streaming", dest.streaming())
	limit := h.cfg.convertTimeout(d.virtualSize)
	cctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	meter := tr.meter(cctx, events.PhaseConvert, events.StateConverting, d.virtualSize)
	err := dest.write(cctx, meter.percent)
	switch {
	case err == nil:
		return nil
	case ctx.Err() == nil && errors.Is(cctx.Err(), context.DeadlineExceeded):
		err = failure.Permanent(events.PhaseConvert, fmt.Errorf("qemu-img convert took longer than %s", limit),
			"raise IMAGEPIPE_CONVERT_TIMEOUT_PER_GIB if the disk is healthy and the scratch disk slow")
	case isNoSpace(err):
		err = failure.Retryable(events.PhaseConvert, err, "free space in IMAGEPIPE_SCRATCH_DIR")
	default:
		err = classifyQemu(events.PhaseConvert, err, d.format)
	}
	return dest.failed(ctx, err)
}

// verify refuses to report success on an output that is not right: the
// output is re-inspected as if it were an upload, must be the target
// format referencing no other file, and a raw one must be exactly the
// virtual size. It returns the output's size.
func (h *Handler) verify(ctx context.Context, j *job, d disk) (int64, error) {
	j.log.Info("verifying", "stage", events.PhaseVerify, "member", d.member)
	st, err := os.Stat(d.output)
	if err != nil {
		return 0, failure.Retryable(events.PhaseVerify, fmt.Errorf("output missing after conversion: %w", err), "")
	}
	size := st.Size()
	if j.outFormat == "raw" && size != d.virtualSize {
		return 0, failure.Permanent(events.PhaseVerify, fmt.Errorf("raw output is %d bytes, the image's virtual size is %d", size, d.virtualSize), "")
	}
	if j.outFormat == "qcow2" {
		rep, err := inspect.InspectFile(d.output, h.limits())
		if err != nil || rep.Format != inspect.Qcow2 {
			return 0, failure.Permanent(events.PhaseVerify, fmt.Errorf("output failed re-inspection (format %q): %v", rep.Format, err), "")
		}
		info, err := h.qemu.Info(ctx, d.output, "qcow2")
		if err != nil {
			return 0, failure.Permanent(events.PhaseVerify, fmt.Errorf("output failed re-inspection: %w", err), "")
		}
		vsize, err := inspect.CheckQemuInfo(rep, info.JSON, d.output, h.limits())
		if err != nil {
			return 0, failure.Permanent(events.PhaseVerify, fmt.Errorf("output failed re-inspection: %w", err), "")
		}
		if vsize != d.virtualSize {
			return 0, failure.Permanent(events.PhaseVerify, fmt.Errorf("qcow2 output has virtual size %d, the input %d", vsize, d.virtualSize), "")
		}
	}
	return size, nil
}

// zeroFraction is the part of the output copied from the zero object.
func (d disk) zeroFraction() float64 {
	if d.outSize <= 0 {
		return 0
	}
	return float64(d.zeroBytes) / float64(d.outSize)
}
