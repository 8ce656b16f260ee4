package convert

import (
	"context"
	"errors"
	"fmt"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/inspect"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
)

// classifyInspect turns the inspector's verdict into a failure: a refusal
// is permanent and names its rule; anything else is an I/O problem with the
// scratch file, which may pass.
func classifyInspect(err error) error {
	var r *inspect.Refusal
	if errors.As(err, &r) {
		return failure.Refused(events.PhaseInspect, r.Rule, err, r.Suggestion)
	}
	return failure.Retryable(events.PhaseInspect, err, "")
}

// classifyWrite decides on a failure to write an output: refused by the
// store (no such bucket, access denied) will stay refused; anything else
// may pass.
func classifyWrite(err error) error {
	if objstore.IsPermanent(err) {
		return failure.Permanent(events.PhaseUpload, err, "check the output bucket exists and the converter may write and tag objects in it")
	}
	return failure.Retryable(events.PhaseUpload, err, "")
}

// classifyQemu decides on a qemu-img failure. qemu-img exiting with an error
// about the image, or killed by a resource limit, will do the same again;
// a cancelled context is a shutdown, and the job is retried elsewhere.
func classifyQemu(phase events.Phase, err error, format inspect.Format) error {
	if errors.Is(err, context.Canceled) {
		return failure.Retryable(phase, err, "")
	}
	var ee *qemuimg.ExitError
	if errors.As(err, &ee) {
		if ee.LimitExceeded() {
			return failure.Refused(phase, events.RuleResourceLimit, fmt.Errorf("qemu-img exceeded its memory or CPU limit on this image: %w", err),
				"the image header asks for more memory or CPU than a sane image needs; re-export the disk")
		}
		return failure.Permanent(phase, fmt.Errorf("qemu-img cannot read this %s image: %w", format, err), suggestion(format))
	}
	return failure.Retryable(phase, err, "")
}

func suggestion(format inspect.Format) string {
	switch format {
	case inspect.VHDX:
		return "the VHDX looks damaged or incomplete; re-export the disk from Hyper-V (Export-VM or Convert-VHD) and upload it again"
	case inspect.VPC:
		return "the VHD looks damaged or incomplete; re-export it and upload it again"
	case inspect.VMDK:
		return "the VMDK looks damaged or incomplete; export it again as a single monolithicSparse or streamOptimized file (OVF export) and upload it"
	case inspect.Qcow2:
		return "the qcow2 looks damaged; check it with `qemu-img check` and upload a repaired copy"
	case inspect.VDI:
		return "the VDI looks damaged; clone it with `VBoxManage clonemedium` and upload the copy"
	}
	return "check the file is a complete disk image and upload it again"
}

// Judge makes the checks convert makes of an inspected disk before it
// converts it, in the same order: the name's extension against the
// header, then qemu-img's own reading of the file. It returns the virtual
// size qemu-img reports, or a failure.Error that says whether the disk is
// refused, and by which rule. `imagepipe inspect` calls it too, so that
// its verdict is convert's.
func Judge(ctx context.Context, qemu QemuImg, rep inspect.Report, path, key string, lim inspect.Limits) (int64, error) {
	if err := inspect.CheckExtension(rep, key); err != nil {
		return 0, classifyInspect(err)
	}
	info, err := qemu.Info(ctx, path, string(rep.Format))
	if err != nil {
		return 0, classifyQemu(events.PhaseInspect, err, rep.Format)
	}
	vsize, err := inspect.CheckQemuInfo(rep, info.JSON, path, lim)
	if err != nil {
		return 0, classifyInspect(err)
	}
	return vsize, nil
}
