package convert

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sync"

	"github.com/dustin/go-humanize"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/inspect"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/scratch"
)

const sugOVA = "export the appliance again as an OVA holding its .ovf descriptor and its VMDK disks, or upload the disk image itself"

// ovaDisk is one disk of an OVA and where it lies in the archive.
type ovaDisk struct {
	disk
	member inspect.OVAMember
}

// convertOVA converts the disks of an OVA and publishes them all or none.
// The archive is judged whole first (inspect.ReadOVA: every header, the
// descriptor, the manifest) and its manifest checked against the bytes;
// only then is a disk extracted. Each disk is extracted, inspected,
// checked, converted and verified in turn, and uploads start once every
// one of them has passed, so a bad disk 2 never leaves disk 1 published.
// Outputs go under the OVA's key (events.OVADiskKey). It returns the
// disks it got to, with the error that stopped it.
func (h *Handler) convertOVA(ctx context.Context, j *job, tr tracker, in downloaded) ([]disk, error) {
	f, err := os.Open(in.path)
	if err != nil {
		return nil, failure.Retryable(events.PhaseInspect, err, "")
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, failure.Retryable(events.PhaseInspect, err, "")
	}
	arc, err := inspect.ReadOVA(f, st.Size(), h.limits())
	if err != nil {
		return nil, classifyInspect(err)
	}
	planned, err := h.planOVA(j, arc)
	if err != nil {
		return nil, err
	}
	// Hashing reads the archive once and writes nothing: cheaper in
	// scratch space than extracting every disk to check it, and a
	// tampered archive is refused before any of it is unpacked.
	if err := arc.CheckManifest(ctx, f); err != nil {
		return nil, classifyInspect(err)
	}
	j.log.Info("ova checked", "stage", events.PhaseInspect, "members", len(arc.Members), "disks", len(planned), "manifest", arc.Manifest)
	var disks []disk
	for _, od := range planned {
		d, err := h.prepareOVADisk(ctx, j, tr, f, od)
		if err != nil {
			return disks, err
		}
		disks = append(disks, d)
	}
	return h.publishOVA(ctx, j, tr, disks)
}

// planOVA gives each disk its scratch files and output key. Scratch names
// are numbered, never taken from the archive.
func (h *Handler) planOVA(j *job, arc *inspect.OVAArchive) ([]ovaDisk, error) {
	disks := make([]ovaDisk, 0, len(arc.Disks))
	for i, m := range arc.Disks {
		key := events.OVADiskKey(h.cfg.OutputPrefix, j.Key, m.Name, j.outFormat)
		if len(key) > events.MaxKeyLen || len(path.Base(key)) > events.MaxSegmentLen {
			return nil, failure.Refused(events.PhaseInspect, events.RuleOVAMemberName,
				fmt.Errorf("the output key of disk %q of the OVA would be %d bytes, with a file name of %d: over the %d-byte limit on a key or the %d-byte limit on one of its segments", m.Name, len(key), len(path.Base(key)), events.MaxKeyLen, events.MaxSegmentLen),
				"give the OVA a shorter key, or its disks shorter names")
		}
		disks = append(disks, ovaDisk{member: m, disk: disk{
			member: m.Name,
			input:  filepath.Join(j.dir, fmt.Sprintf("disk-%d", i+1)),
			output: filepath.Join(j.dir, fmt.Sprintf("disk-%d.%s", i+1, j.outFormat)),
			extKey: m.Name,
			outKey: key,
		}})
	}
	return disks, nil
}

// prepareOVADisk takes one disk up to a verified output in scratch:
// extract, inspect, check, convert, verify. Nothing is uploaded here.
func (h *Handler) prepareOVADisk(ctx context.Context, j *job, tr tracker, arc *os.File, od ovaDisk) (disk, error) {
	d := od.disk
	if err := extractMember(ctx, j, arc, od.member, d.input); err != nil {
		return d, err
	}
	rep, err := inspect.InspectFile(d.input, h.limits())
	if err != nil {
		return d, classifyInspect(fmt.Errorf("disk %q of the OVA: %w", d.member, err))
	}
	if rep.Format == inspect.OVA {
		return d, failure.Refused(events.PhaseInspect, events.RuleOVAMember, fmt.Errorf("disk %q of the OVA is itself an archive", d.member), sugOVA)
	}
	d.format = rep.Format
	if d.virtualSize, err = h.check(ctx, j, d, rep); err != nil {
		return d, err
	}
	if err := h.convert(ctx, j, tr, d, fileOutput{h: h, j: j, tr: tr, d: d}); err != nil {
		return d, err
	}
	if d.outSize, err = h.verify(ctx, j, d); err != nil {
		return d, err
	}
	// The extracted disk is done with; the next one may need the room.
	_ = os.Remove(d.input)
	return d, nil
}

// publishOVA uploads the verified outputs of every disk and returns them
// complete. It runs only once all of them exist, so a failure before it
// leaves the output bucket as it was. The disks upload side by side and
// none completes until every one has all its parts up (see
// commitBarrier): an upload that fails midway leaves no disk of this OVA
// published. Only a failure in the final completion calls themselves,
// moments apart, could still publish some disks and not others; a retry
// then publishes them all.
func (h *Handler) publishOVA(ctx context.Context, j *job, tr tracker, disks []disk) ([]disk, error) {
	if len(disks) == 1 {
		d, err := h.publishDisk(ctx, j, tr, disks[0], h.guard(j, disks[0].outKey))
		return []disk{d}, err
	}
	b := newCommitBarrier(len(disks))
	done := make([]disk, len(disks))
	errs := make([]error, len(disks))
	var wg sync.WaitGroup
	for i, d := range disks {
		wg.Go(func() {
			done[i], errs[i] = h.publishDisk(ctx, j, tr, d, b.guard(h.guard(j, d.outKey)))
			if errs[i] != nil {
				b.fail()
			}
		})
	}
	wg.Wait()
	// The disk that failed says why; the others only waited for it.
	var first error
	for _, err := range errs {
		if err != nil && !errors.Is(err, errOtherDiskFailed) {
			return done, err
		}
		if first == nil {
			first = err
		}
	}
	return done, first
}

// publishDisk uploads one verified disk of an OVA under guard and marks
// it complete.
func (h *Handler) publishDisk(ctx context.Context, j *job, tr tracker, d disk, guard objstore.Guard) (disk, error) {
	st, err := h.uploadFile(ctx, j, tr, d, guard)
	if err != nil {
		return d, err
	}
	return h.complete(ctx, j, d, st)
}

// errOtherDiskFailed vetoes the completion of a disk whose sibling in the
// same OVA failed to upload.
var errOtherDiskFailed = errors.New("another disk of the OVA failed to upload, so none is published")

// commitBarrier holds the completion of each of an OVA's uploads until all
// of them are ready to complete, or releases them all with a veto as soon
// as one fails.
type commitBarrier struct {
	mu      sync.Mutex
	waiting int
	ready   chan struct{} // closed when every upload is ready
	failed  chan struct{} // closed when one upload failed
	once    sync.Once
}

func newCommitBarrier(n int) *commitBarrier {
	return &commitBarrier{waiting: n, ready: make(chan struct{}), failed: make(chan struct{})}
}

// guard wraps one upload's own guard: that runs first, then the upload
// waits for the others. A guard may run more than once (a completion lost
// to another writer is tried again); the upload counts as ready once.
func (b *commitBarrier) guard(own objstore.Guard) objstore.Guard {
	var arrived sync.Once
	check := func(ctx context.Context) error {
		if err := own.Check(ctx); err != nil {
			b.fail()
			return err
		}
		select {
		case <-b.failed:
			return errOtherDiskFailed
		default:
		}
		arrived.Do(func() {
			b.mu.Lock()
			defer b.mu.Unlock()
			if b.waiting--; b.waiting == 0 {
				close(b.ready)
			}
		})
		select {
		case <-b.ready:
			return nil
		case <-b.failed:
			return errOtherDiskFailed
		case <-ctx.Done():
			b.fail()
			return ctx.Err()
		}
	}
	return objstore.Guard{Check: check, Started: own.Started}
}

func (b *commitBarrier) fail() { b.once.Do(func() { close(b.failed) }) }

// extractMember copies one member out of the archive, no further than
// the size the first pass found for it, and stops when ctx is done.
func extractMember(ctx context.Context, j *job, arc *os.File, m inspect.OVAMember, dst string) error {
	if err := roomFor(j.dir, m); err != nil {
		return err
	}
	j.log.Info("extracting", "stage", events.PhaseInspect, "member", m.Name, "size", m.Size)
	out, err := scratch.Create(dst)
	if err != nil {
		return failure.Retryable(events.PhaseInspect, fmt.Errorf("extract %q from the OVA: %w", m.Name, err), "")
	}
	n, err := io.Copy(ctxWriter{ctx, out}, io.NewSectionReader(arc, m.Offset, m.Size))
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err == nil && n != m.Size {
		err = fmt.Errorf("read %d of its %d bytes: %w", n, m.Size, io.ErrUnexpectedEOF)
	}
	if err == nil {
		return nil
	}
	err = fmt.Errorf("extract %q from the OVA: %w", m.Name, err)
	if isNoSpace(err) {
		// roomFor saw the member fit: something else filled the shared
		// scratch space since, and a later attempt may find it free.
		return failure.Retryable(events.PhaseInspect, err, "free space in IMAGEPIPE_SCRATCH_DIR, or lower IMAGEPIPE_MAX_CONCURRENT_JOBS")
	}
	return failure.Retryable(events.PhaseInspect, err, "")
}

// roomFor checks that a member fits the scratch file system before any of
// it is written. Its size is that of bytes present in the archive, which
// is already on the same file system, never a claim: an OVA whose disk
// cannot fit even an empty scratch file system is refused for good, and
// one that does not fit the space left now waits for others to finish.
func roomFor(dir string, m inspect.OVAMember) error {
	free, total, err := scratch.DiskSpace(dir)
	if err != nil {
		return nil // the copy itself will tell
	}
	switch {
	case m.Size > total:
		return failure.Refused(events.PhaseInspect, events.RuleScratchSpace,
			fmt.Errorf("disk %q of the OVA is %s, more than the whole scratch file system (%s)", m.Name, humanize.IBytes(uint64(m.Size)), humanize.IBytes(uint64(total))),
			"point IMAGEPIPE_SCRATCH_DIR at a larger disk, or upload the appliance's disks one by one")
	case m.Size > free:
		return failure.Retryable(events.PhaseInspect,
			fmt.Errorf("disk %q of the OVA is %s, and only %s of scratch space is free", m.Name, humanize.IBytes(uint64(m.Size)), humanize.IBytes(uint64(free))),
			"free space in IMAGEPIPE_SCRATCH_DIR, lower IMAGEPIPE_MAX_CONCURRENT_JOBS, or point IMAGEPIPE_SCRATCH_DIR at a larger disk")
	}
	return nil
}
