package convert

import (
	"context"
	"fmt"
	"io"
	"strconv"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/inspect"
	"github.com/imagepipe/imagepipe/internal/objstore"
)

// action is what a job's plan says to do.
type action int

const (
	// convert: download, inspect, convert, verify, upload.
	actConvert action = iota
	// done: an earlier delivery of this job uploaded its output and died
	// before the result was published; the output is reported again.
	actDone
	// leave: an earlier delivery of this job is still at work.
	actLeave
	// refuse: the job cannot be done, and the plan already knows why.
	actRefuse
	// duplicate: the same content was converted before; its output is
	// copied server-side instead.
	actDuplicate
	// copy: a raw upload wanted raw is copied server-side, not converted.
	actCopy
)

// plan is what a job will do, decided from one look at its input and one
// at its output before any work starts.
type plan struct {
	action    action
	outFormat string
	outKey    string
	// upload is the input as looked at; nil when the look failed.
	upload *objstore.Object
	// output is what the output key holds; nil when nothing, or when
	// the look failed with outputErr.
	output    *objstore.Object
	outputErr error
	// done is the result already in place (actDone).
	done outcome
	// earlier is the output of the same content to copy (actDuplicate).
	earlier earlierOutput
	// header is the inspector's verdict on a raw upload (actCopy).
	header inspect.Report
	// err is why the job is refused (actRefuse) or left (actLeave).
	err error
}

// plan looks at the input and the output once each and decides what the
// job does: report an output already in place, leave the job to an
// earlier delivery still running, refuse it, copy an earlier conversion
// of the same content or the raw upload itself server-side, or convert.
// cur is the image's status record, if it has one.
func (h *Handler) plan(ctx context.Context, j *job, cur *events.Status) plan {
	var p plan
	up, lookErr := j.store.Stat(ctx, j.Bucket, j.Key)
	if lookErr == nil {
		p.upload = &up
	}
	format, err := h.outputFormat(j.ConvertJob, p.upload)
	if err != nil {
		return plan{action: actRefuse, err: err}
	}
	p.outFormat, p.outKey = format, events.OutputKey(h.cfg.OutputPrefix, j.Key, format)
	out, err := j.store.Stat(ctx, h.cfg.OutputBucket, p.outKey)
	if err == nil {
		p.output = &out
	}
	p.outputErr = err
	if done, ok := h.alreadyDone(ctx, j, p); ok {
		done.earlier = true
		p.action, p.done = actDone, done
		return p
	}
	if cur != nil && h.earlierDeliveryRunning(j, *cur) {
		p.action = actLeave
		p.err = failure.Retryable(events.PhaseDownload, fmt.Errorf("delivery %d of this job is still %s", cur.Attempt, cur.State), "")
		return p
	}
	switch {
	case lookErr != nil:
		p.action, p.err = actRefuse, classifyDownload(j, lookErr)
		return p
	case superseded(j, up):
		p.action, p.err = actRefuse, errSuperseded
		return p
	}
	if earlier, ok := h.findEarlier(ctx, j, p, h.contentKey(j, "")); ok {
		p.action, p.earlier = actDuplicate, earlier
		return p
	}
	if rep, ok := h.rawUpload(ctx, j, p); ok {
		p.action, p.header = actCopy, rep
		return p
	}
	p.action = actConvert
	return p
}

// outputFormat decides, once, what the job writes: the format the job
// names, else the one the upload asks for in x-amz-meta-imagepipe-format,
// else IMAGEPIPE_OUTPUT_FORMAT.
func (h *Handler) outputFormat(cj events.ConvertJob, upload *objstore.Object) (string, error) {
	if f := cj.OutputFormat; f != "" {
		return f, checkFormat(f)
	}
	if upload != nil {
		switch f := upload.Metadata[events.MetaFormat]; f {
		case "":
		case "raw", "qcow2":
			return f, nil
		default:
			return "", failure.Refused(events.PhaseDownload, events.RuleOutputFormat, fmt.Errorf("the upload asks for output format %q", f),
				"set x-amz-meta-imagepipe-format to raw or qcow2, or leave it out")
		}
	}
	return h.cfg.OutputFormat, checkFormat(h.cfg.OutputFormat)
}

func checkFormat(f string) error {
	if f != "raw" && f != "qcow2" {
		return failure.Permanent(events.PhaseConvert, fmt.Errorf("output format %q is not raw or qcow2", f), "set IMAGEPIPE_OUTPUT_FORMAT to raw or qcow2")
	}
	return nil
}

// superseded reports whether cur, the input as it is now, is no longer
// the version and content the job was queued for. A job without a version
// id or ETag (none queued by ingest lacks both) has nothing to compare.
func superseded(j *job, cur objstore.Object) bool {
	return (j.VersionID != "" && cur.VersionID != j.VersionID) || (j.ETag != "" && cur.ETag != j.ETag)
}

// alreadyDone reports whether a previous delivery of this job uploaded its
// output but died before the result was published: the output is then
// reported again instead of converted again.
func (h *Handler) alreadyDone(ctx context.Context, j *job, p plan) (outcome, bool) {
	obj := p.output
	// The job id names the input's version and ETag (or is a reconvert's
	// own), so an output of another version never counts as this job's.
	if obj == nil || obj.Metadata[events.MetaJob] != j.JobID {
		return outcome{}, false
	}
	vsize, err := strconv.ParseInt(obj.Metadata[events.MetaVirtualSize], 10, 64)
	if err != nil {
		return outcome{}, false
	}
	// The hash is tagged last: without it the upload may not have
	// finished, and converting again is the safe answer.
	sum := outputSHA256(ctx, j.store, *obj)
	if sum == "" {
		return outcome{}, false
	}
	format := inspect.Format(obj.Metadata[events.MetaInputFormat])
	return outcome{format: format, inputSize: j.Size, disks: []disk{{
		outKey: p.outKey, sha256: sum, crc64nvme: obj.CRC64NVME, outSize: obj.Size, virtualSize: vsize, format: format,
	}}}, true
}

// earlierDeliveryRunning reports whether cur says an earlier delivery of
// this job is still at work: the server hands a job out again when its
// keep-alives were lost (to a NATS leader change, say), not only when its
// replica died. A live delivery moves the record every few hundred
// milliseconds while it downloads, converts or uploads; a dead one's record
// is at least two thirds of AckWait old by the time the job comes again
// (keep-alives go every third of it), so half of AckWait tells them apart.
func (h *Handler) earlierDeliveryRunning(j *job, cur events.Status) bool {
	switch cur.State {
	case events.StateDownloading, events.StateInspecting, events.StateConverting, events.StateUploading:
	default:
		return false
	}
	return cur.JobID == j.JobID && cur.Attempt > 0 && cur.Attempt < j.attempt &&
		h.now().Sub(cur.UpdatedAt) < h.cfg.AckWait/2
}

// outputSHA256 is the sha256 recorded on an output, "" if none is. Outputs
// written before the hash moved to a tag carry it as metadata.
func outputSHA256(ctx context.Context, store Storage, obj objstore.Object) string {
	if v := obj.Metadata[events.MetaSHA256]; v != "" {
		return v
	}
	tags, err := store.Tags(ctx, obj.Bucket, obj.Key)
	if err != nil {
		return ""
	}
	return tags[events.TagSHA256]
}

// rawUpload reports whether the upload is a raw image wanted as raw,
// which is then copied server-side instead of downloaded and converted.
// The header is inspected through ranged reads. Anything it cannot tell
// goes the full way, where the download reports what is wrong.
func (h *Handler) rawUpload(ctx context.Context, j *job, p plan) (inspect.Report, bool) {
	up := p.upload
	if p.outFormat != "raw" || up.Size == 0 {
		return inspect.Report{}, false
	}
	if f := up.Metadata[events.MetaFormat]; f != "" && f != "raw" {
		return inspect.Report{}, false
	}
	ra, err := j.store.ReaderAt(ctx, j.Bucket, j.Key, j.VersionID)
	if err != nil {
		return inspect.Report{}, false
	}
	defer ra.Close()
	hr := newHeaderReader(ra, up.Size)
	head := make([]byte, 8)
	if _, err := hr.ReadAt(head, 0); err != nil && err != io.EOF {
		return inspect.Report{}, false
	}
	if isCompressed(head) {
		return inspect.Report{}, false
	}
	rep, err := inspect.Inspect(hr, up.Size, h.limits())
	if err != nil || rep.Format != inspect.Raw {
		return inspect.Report{}, false
	}
	return rep, true
}

// headerReader serves the inspector's reads of an object's header from
// blocks fetched once each: telling a format reads small regions near one
// another, and each ranged read of the object is a request of its own.
// Past maxHeaderBlocks, reads go to the object as they come.
type headerReader struct {
	ra     io.ReaderAt
	size   int64
	blocks map[int64][]byte
}

const (
	headerBlock     = 256 << 10
	maxHeaderBlocks = 16
)

func newHeaderReader(ra io.ReaderAt, size int64) *headerReader {
	return &headerReader{ra: ra, size: size, blocks: map[int64][]byte{}}
}

func (r *headerReader) ReadAt(p []byte, off int64) (int, error) {
	if off >= r.size {
		return 0, io.EOF
	}
	n := 0
	for n < len(p) && off+int64(n) < r.size {
		pos := off + int64(n)
		b, err := r.block(pos / headerBlock)
		if err != nil {
			return n, err
		}
		if b == nil {
			m, err := r.ra.ReadAt(p[n:], pos)
			return n + m, err
		}
		n += copy(p[n:], b[pos%headerBlock:])
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// block is the i-th block of the object, fetched if it is not yet; nil
// once the cache is full.
func (r *headerReader) block(i int64) ([]byte, error) {
	if b, ok := r.blocks[i]; ok {
		return b, nil
	}
	if len(r.blocks) >= maxHeaderBlocks {
		return nil, nil
	}
	start := i * headerBlock
	b := make([]byte, min(headerBlock, r.size-start))
	if _, err := r.ra.ReadAt(b, start); err != nil && err != io.EOF {
		return nil, err
	}
	r.blocks[i] = b
	return b, nil
}
