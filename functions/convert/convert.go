package convert

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/google/uuid"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/dedup"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/inspect"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
	"github.com/imagepipe/imagepipe/internal/sparse"
	"github.com/imagepipe/imagepipe/internal/status"
)

// Source is the CloudEvents source of convert's results.
const Source = "/imagepipe/convert"

// Metadata keys set on every output object, and read from uploads.
const (
	MetaOutput = "imagepipe-output" // marks outputs so ingest never takes them in
	MetaJob    = "imagepipe-job"
	MetaSource = "imagepipe-source"
	MetaSHA256 = "imagepipe-sha256" // on an upload: the sha256 its bytes must have
	MetaInput  = "imagepipe-input-format"
	MetaVSize  = "imagepipe-virtual-size"
	MetaFormat = "imagepipe-format" // on an upload: the output format wanted
	// The version and ETag of the upload an output was made from, so
	// that anyone can tell which version of the input it holds.
	MetaSourceVersion = "imagepipe-source-version"
	MetaSourceETag    = "imagepipe-source-etag"
)

// TagSHA256 is the object tag holding an output's sha256. A tag, not
// metadata: metadata is fixed when an upload starts, and the hash is
// computed while the output uploads.
const TagSHA256 = "imagepipe-sha256"

// Storage is the part of object storage convert uses.
type Storage interface {
	Open(ctx context.Context, bucket, key, versionID, etag string) (io.ReadCloser, objstore.Object, error)
	// Upload, UploadGrowing and Copy write an output only if guard, run
	// just before the write completes, allows it (see objstore/commit.go).
	Upload(ctx context.Context, bucket, key string, f *sparse.File, meta map[string]string, progress io.Reader, guard objstore.Guard) (objstore.Object, error)
	UploadGrowing(ctx context.Context, bucket, key string, src objstore.Growing, size int64, meta map[string]string, progress io.Reader, guard objstore.Guard) (objstore.Object, error)
	Stat(ctx context.Context, bucket, key string) (objstore.Object, error)
	ReaderAt(ctx context.Context, bucket, key, versionID string) (objstore.RangeReader, error)
	Copy(ctx context.Context, srcBucket, srcKey, srcVersion, srcETag, dstBucket, dstKey string, meta, tags map[string]string, guard objstore.Guard) (objstore.Object, error)
	Abort(ctx context.Context, bucket, key, uploadID string) error
	Pending(ctx context.Context, bucket, key string) ([]objstore.Pending, error)
	SetTags(ctx context.Context, bucket, key, versionID string, tags map[string]string) error
	Tags(ctx context.Context, bucket, key string) (map[string]string, error)
	PutBytes(ctx context.Context, bucket, key string, body []byte, contentType string, meta map[string]string) error
}

// QemuImg is the part of qemu-img convert uses.
type QemuImg interface {
	Info(ctx context.Context, path, format string) (qemuimg.InfoResult, error)
	Convert(ctx context.Context, src, srcFormat, dst, dstFormat string, onProgress func(percent float64)) error
	ConvertToNBD(ctx context.Context, src, srcFormat, socket string, onProgress func(percent float64)) error
	Version(ctx context.Context) (string, error)
}

// Reporter records state transitions and live progress. Both are hints for
// people watching: a failure to report never fails the job. Set writes only
// a forward transition and refuses any other with status.ErrNotForward.
type Reporter interface {
	Get(ctx context.Context, bucket, key string) (events.Status, error)
	Set(ctx context.Context, st events.Status) error
	Progress(p events.Progress) error
}

// Handler converts one job.
type Handler struct {
	dedup  Deduper
	cfg    Config
	store  Storage
	qemu   QemuImg
	report Reporter
	log    *slog.Logger
	now    func() time.Time
	// streamAbove is the smallest raw output uploaded while it converts
	// (see stream.go); tests lower it.
	streamAbove int64
}

// New returns a handler. dd may be nil: content de-duplication is then off.
func New(cfg Config, store Storage, qemu QemuImg, report Reporter, dd Deduper, log *slog.Logger) *Handler {
	cfg.ScratchDir = cfg.Scratch()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	h := &Handler{cfg: cfg, store: store, qemu: qemu, report: report, dedup: dd, log: log, now: time.Now,
		streamAbove: objstore.PartSize}
	// A replica killed mid-job left its scratch behind; starting up is the
	// first chance to reclaim it.
	h.sweep(context.Background(), log)
	return h
}

// sweep reclaims what the jobs of processes that died left behind: their
// scratch, and the output uploads they started and never finished.
func (h *Handler) sweep(ctx context.Context, log *slog.Logger) {
	removed, uploads, unnamed := sweepScratch(h.cfg.ScratchDir, h.now())
	if len(removed) > 0 {
		log.Info("removed scratch of jobs whose process died", "dirs", removed)
	}
	if len(unnamed) > 0 {
		uploads = append(uploads, h.unnamedUploads(ctx, unnamed, log)...)
	}
	for _, u := range uploads {
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		err := h.store.Abort(actx, u.Bucket, u.Key, u.UploadID)
		cancel()
		if err != nil {
			log.Warn("upload left by a job whose process died not aborted; the server's expiry of stale uploads will remove it", "output_key", u.Key, "err", err)
		}
	}
}

// unnamedUploads finds the uploads that dead jobs were starting when they
// died, before they could note the id: those of the same key that the
// server began since (less a little for clocks that disagree), and that no
// job still running on this scratch named. An upload of the same key that
// a replica on another host began in those moments would be taken too; a
// job whose upload is aborted under it fails its completion and is
// retried, so the only cost is that retry.
func (h *Handler) unnamedUploads(ctx context.Context, unnamed []notedUpload, log *slog.Logger) []notedUpload {
	const skew = 2 * time.Second
	live := liveUploadIDs(h.cfg.ScratchDir)
	var out []notedUpload
	for _, u := range unnamed {
		lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		pending, err := h.store.Pending(lctx, u.Bucket, u.Key)
		cancel()
		if err != nil {
			log.Warn("uploads of a job whose process died not looked up; the server's expiry of stale uploads will remove them", "output_key", u.Key, "err", err)
			continue
		}
		for _, p := range pending {
			if !p.Initiated.Before(u.Since.Add(-skew)) && !live[p.UploadID] {
				out = append(out, notedUpload{Bucket: u.Bucket, Key: u.Key, UploadID: p.UploadID})
			}
		}
	}
	return out
}

// job is one conversion in flight: the queued job plus what the stages
// learn along the way.
type job struct {
	events.ConvertJob
	attempt, maxAttempts int
	started              time.Time
	log                  *slog.Logger
	dir                  string
	input                string // the download, decompressed
	inputSize            int64
	sha256In             string // of the object as uploaded
	codec                string // compression the upload came in
	meta                 map[string]string
	outFormat            string
	format               inspect.Format // of the upload (ova for an appliance)
	disks                []*disk
	duplicateOf          string // "bucket/key" of the earlier output this one copies
	upload               *objstore.Object
}

// disk is one image to convert: the upload itself, or one disk of an OVA.
type disk struct {
	member      string // name inside the OVA; "" for a plain upload
	input       string
	output      string
	extKey      string // the name whose extension must agree with the content
	format      inspect.Format
	virtualSize int64
	outKey      string
	outSize     int64
	sha256      string
}

// Handle runs a job through every stage and returns its result events. On
// failure it returns the failed event and the classified error together:
// the event says whether the runtime will retry.
func (h *Handler) Handle(ctx context.Context, cj events.ConvertJob, attempt, maxAttempts int) ([]events.Message, error) {
	// A job queued again after its message was lost counts on from the
	// deliveries it had, and has a fresh set of its own.
	j := &job{
		ConvertJob:  cj,
		attempt:     cj.PriorAttempts + attempt,
		maxAttempts: cj.PriorAttempts + maxAttempts,
		started:     h.now(),
		log:         h.log.With("job", cj.JobID, "bucket", cj.Bucket, "key", cj.Key),
		outFormat:   cj.OutputFormat,
	}
	if j.outFormat == "" {
		j.outFormat = h.cfg.OutputFormat
	}
	if j.outFormat != "raw" && j.outFormat != "qcow2" {
		return h.fail(ctx, j, failure.Permanent(events.PhaseConvert, fmt.Errorf("output format %q is not raw or qcow2", j.outFormat), "set IMAGEPIPE_OUTPUT_FORMAT to raw or qcow2"))
	}
	cur, err := h.report.Get(ctx, j.Bucket, j.Key)
	if err == nil && cur.JobID == j.JobID && cur.State == events.StateCancelled {
		j.log.Info("cancelled by an operator before it started", "stage", "cancelled")
		return h.fail(ctx, j, failure.Refused(events.PhaseDownload, RuleCancelled, failure.ErrCancelled, ""))
	}
	h.applyUploadFormat(ctx, j)
	if d, ok := h.alreadyDone(ctx, j); ok {
		j.log.Info("output of this job already uploaded; reporting it again", "stage", "ready", "output_key", d.outKey)
		j.disks = []*disk{d}
		return h.succeed(ctx, j)
	}
	if err == nil && h.earlierDeliveryRunning(j, cur) {
		// Not through fail: a status written now would take the record
		// over from the delivery that is doing the work.
		j.log.Info("an earlier delivery of this job is still running; leaving the job to it", "stage", "queued",
			"running_attempt", cur.Attempt, "running_state", cur.State)
		return nil, failure.Retryable(events.PhaseDownload,
			fmt.Errorf("delivery %d of this job is still %s", cur.Attempt, cur.State), "")
	}
	err = h.work(ctx, j)
	if errors.Is(err, errSuperseded) {
		j.log.Info("object changed since it was queued; its newer upload has its own job", "stage", "download")
		h.handBack(ctx, j)
		return nil, nil
	}
	if err != nil {
		return h.fail(ctx, j, err)
	}
	return h.succeed(ctx, j)
}

var errSuperseded = errors.New("object superseded")

// Exhausted reports a job no delivery finished: each ended with its
// replica gone (killed, out of memory), so no attempt could say why. It
// fails for good; `imagepipe reconvert` starts it again.
func (h *Handler) Exhausted(ctx context.Context, cj events.ConvertJob, deliveries int) []events.Message {
	j := &job{
		ConvertJob:  cj,
		attempt:     deliveries,
		maxAttempts: deliveries,
		started:     h.now(),
		log:         h.log.With("job", cj.JobID, "bucket", cj.Bucket, "key", cj.Key),
	}
	out, _ := h.fail(ctx, j, failure.Permanent(events.PhaseConvert,
		fmt.Errorf("the converter stopped %d times while working on this upload and never finished it", deliveries),
		"look for convert replicas that were killed or ran out of memory during its attempts; once that is fixed, run `imagepipe reconvert "+cj.Bucket+"/"+cj.Key+"`"))
	return out
}

// applyUploadFormat honours x-amz-meta-imagepipe-format on the upload when
// the job itself names no format. A bad value is refused at download.
func (h *Handler) applyUploadFormat(ctx context.Context, j *job) {
	if j.ConvertJob.OutputFormat != "" {
		return
	}
	if obj, err := h.store.Stat(ctx, j.Bucket, j.Key); err == nil {
		j.upload = &obj
		if f := obj.Metadata[MetaFormat]; f == "raw" || f == "qcow2" {
			j.outFormat = f
		}
	}
}

// alreadyDone reports whether a previous delivery of this job uploaded its
// output but died before the result was published: the output is then
// reported again instead of converted again.
func (h *Handler) alreadyDone(ctx context.Context, j *job) (*disk, bool) {
	key := h.outputKey(j)
	obj, err := h.store.Stat(ctx, h.cfg.OutputBucket, key)
	// The job id names the input's version and ETag (or is a reconvert's
	// own), so an output of another version never counts as this job's.
	if err != nil || obj.Metadata[MetaJob] != j.JobID {
		return nil, false
	}
	vsize, err := strconv.ParseInt(obj.Metadata[MetaVSize], 10, 64)
	if err != nil {
		return nil, false
	}
	// The hash is tagged last: without it the upload may not have
	// finished, and converting again is the safe answer.
	sum := h.outputSHA256(ctx, obj)
	if sum == "" {
		return nil, false
	}
	j.format = inspect.Format(obj.Metadata[MetaInput])
	j.inputSize = j.Size
	return &disk{outKey: key, sha256: sum, outSize: obj.Size, virtualSize: vsize, format: j.format}, true
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
func (h *Handler) outputSHA256(ctx context.Context, obj objstore.Object) string {
	if v := obj.Metadata[MetaSHA256]; v != "" {
		return v
	}
	tags, err := h.store.Tags(ctx, obj.Bucket, obj.Key)
	if err != nil {
		return ""
	}
	return tags[TagSHA256]
}

// work does the job in a scratch dir of its own: a copy of an earlier
// output of the same content, a server-side copy of a raw upload, or a
// download and conversion. Even a copy needs the dir: its upload is noted
// there, for the sweep that follows a process's death.
func (h *Handler) work(ctx context.Context, j *job) error {
	h.sweep(ctx, j.log)
	dir, release, err := newJobDir(h.cfg.ScratchDir)
	if err != nil {
		return failure.Retryable(events.PhaseDownload, fmt.Errorf("create scratch dir: %w", err), "check IMAGEPIPE_SCRATCH_DIR exists and is writable")
	}
	// Scratch paths never derive from the object key, which the uploader
	// chose; and they never outlive the job, even one whose process died.
	defer release()
	j.dir = dir
	j.input = filepath.Join(dir, "input")
	if done, err := h.reuse(ctx, j); done {
		return err
	}
	if done, err := h.copyRaw(ctx, j); done {
		return err
	}
	return h.run(ctx, j)
}

// run downloads, inspects and converts the upload.
func (h *Handler) run(ctx context.Context, j *job) error {
	if err := h.download(ctx, j); err != nil {
		return err
	}
	if h.cfg.Dedup.Hash == dedup.HashSHA256 {
		// Only now is the content's hash known.
		if done, err := h.reuse(ctx, j); done || err != nil {
			return err
		}
	}
	h.setState(ctx, j, events.StateInspecting, 0)
	j.log.Info("inspecting", "stage", events.PhaseInspect)
	rep, err := inspect.InspectFile(j.input, h.limits())
	if err != nil {
		return classifyInspect(err)
	}
	j.format = rep.Format
	if rep.Format == inspect.OVA {
		return h.convertOVA(ctx, j)
	}
	d := &disk{
		input:  j.input,
		output: filepath.Join(j.dir, "output."+j.outFormat),
		extKey: keyForExtension(j.Key, j.codec),
		format: rep.Format,
		outKey: h.outputKey(j),
	}
	j.disks = append(j.disks, d)
	return h.convertDisk(ctx, j, d, rep)
}

// outputKey is where a plain upload's output is written (events.OutputKey).
func (h *Handler) outputKey(j *job) string {
	return events.OutputKey(h.cfg.OutputPrefix, j.Key, j.outFormat)
}

func (h *Handler) limits() inspect.Limits {
	return h.cfg.InspectLimits()
}

func (h *Handler) setState(ctx context.Context, j *job, state events.State, percent float64) {
	h.record(ctx, j, h.status(j, state, percent))
}

// record writes a status that is a hint: a failure to record is logged,
// never the job's failure. A write the record refused as not forward means
// another delivery of this job is ahead, which is nothing to warn about.
func (h *Handler) record(ctx context.Context, j *job, st events.Status) {
	err := h.report.Set(ctx, st)
	switch {
	case errors.Is(err, status.ErrNotForward):
		j.log.Debug("status not moved: another delivery of this job is ahead", "state", st.State, "err", err)
	case err != nil:
		j.log.Warn("status not recorded", "state", st.State, "err", err)
	}
}

func (h *Handler) status(j *job, state events.State, percent float64) events.Status {
	st := events.Status{
		Bucket: j.Bucket, Key: j.Key, JobID: j.JobID, State: state, Percent: percent,
		InputFormat: string(j.format), Attempt: j.attempt, UpdatedAt: h.now().UTC(),
	}
	if (state == events.StateReady || state == events.StateDuplicate) && len(j.disks) > 0 {
		st.OutputBucket, st.OutputKey = h.cfg.OutputBucket, j.disks[0].outKey
		if j.duplicateOf != "" {
			st.Message = "same content as " + j.duplicateOf
		}
	}
	return st
}

func (h *Handler) succeed(ctx context.Context, j *job) ([]events.Message, error) {
	state := events.StateReady
	if j.duplicateOf != "" {
		state = events.StateDuplicate
	}
	st := h.status(j, state, 100)
	// The final state is what `imagepipe status` and `upload` wait for: if
	// it cannot be recorded, the job is delivered again, finds its output
	// in place and records it then. A record that already holds this job
	// as finished (an earlier delivery whose ack was lost wrote it) stays
	// as it is: watchers see the image finish once.
	statusErr := h.report.Set(ctx, st)
	again := errors.Is(statusErr, status.ErrNotForward)
	if again {
		statusErr = nil
	}
	h.remember(ctx, j)
	took := h.now().Sub(j.started)
	var out []events.Message
	for _, d := range j.disks {
		data := events.Converted{
			JobID: j.JobID, InputBucket: j.Bucket, InputKey: j.Key, InputFormat: string(d.format),
			InputSize: j.inputSize, VirtualSize: d.virtualSize,
			OutputBucket: h.cfg.OutputBucket, OutputKey: d.outKey, OutputFormat: j.outFormat,
			OutputSize: d.outSize, SHA256: d.sha256, DurationMS: took.Milliseconds(), Attempt: j.attempt,
			DuplicateOf: j.duplicateOf,
		}
		ev, err := events.New(eventID(j.JobID, "converted/"+d.member), events.TypeConverted, Source, j.Key, h.now(), data)
		if err != nil {
			return nil, failure.Permanent(events.PhasePublish, err, "")
		}
		out = append(out, events.Message{Subject: events.SubjectConverted, Event: ev})
		if again {
			j.log.Info("already reported by an earlier delivery; result published again", "stage", "ready", "output_key", d.outKey)
			continue
		}
		j.log.Info("converted", "stage", "ready", "output_key", d.outKey, "sha256", d.sha256, "duration", took)
	}
	if statusErr != nil {
		return out, failure.Retryable(events.PhasePublish, fmt.Errorf("record state %s: %w", state, statusErr), "")
	}
	return out, nil
}

// RuleCancelled marks the failure event of a job an operator cancelled.
const RuleCancelled = "cancelled"

func (h *Handler) fail(ctx context.Context, j *job, err error) ([]events.Message, error) {
	cancelled := errors.Is(context.Cause(ctx), failure.ErrCancelled) || errors.Is(err, failure.ErrCancelled)
	if ctx.Err() != nil && !cancelled {
		// A shutdown, not a failure: the job goes back to the queue and
		// runs again on another replica; there is nothing to report.
		j.log.Info("interrupted by shutdown; the job will run again", "stage", "queued")
		h.record(context.WithoutCancel(ctx), j, events.Status{Bucket: j.Bucket, Key: j.Key, JobID: j.JobID,
			State: events.StateQueued, Attempt: j.attempt, UpdatedAt: h.now().UTC()})
		return nil, failure.Retryable(events.PhaseConvert, ctx.Err(), "")
	}
	// Reporting outlives the job's own context, which a cancel has ended.
	ctx = context.WithoutCancel(ctx)
	fe, ok := failure.As(err)
	if cancelled {
		phase := events.PhaseConvert
		if ok {
			phase = fe.Phase
		}
		fe = failure.Refused(phase, RuleCancelled, failure.ErrCancelled, "upload the image again, or run `imagepipe reconvert`, to convert it after all")
		err = fe
	} else if !ok {
		fe = failure.Retryable(events.PhaseConvert, err, "")
		err = fe
	}
	retry := failure.WillRetry(err, j.attempt, j.maxAttempts)
	data := events.Failed{
		JobID: j.JobID, InputBucket: j.Bucket, InputKey: j.Key, InputFormat: string(j.format),
		Phase: fe.Phase, Message: fe.Err.Error(), Suggestion: fe.Suggestion, Rule: fe.Rule,
		Attempt: j.attempt, WillRetry: retry, DurationMS: h.now().Sub(j.started).Milliseconds(),
		System: h.system(ctx),
	}
	st := events.Status{
		Bucket: j.Bucket, Key: j.Key, JobID: j.JobID, State: events.StateFailed, Phase: fe.Phase,
		Message: data.Message, Suggestion: fe.Suggestion, InputFormat: string(j.format), Attempt: j.attempt,
		UpdatedAt: h.now().UTC(),
	}
	switch {
	case cancelled:
		st.State = events.StateCancelled
	case retry:
		// Still QUEUED: it comes back after the back-off.
		st.State = events.StateQueued
	}
	h.record(ctx, j, st)
	if !retry && !cancelled {
		h.writeErrorReport(ctx, j, data)
	}
	j.log.Warn("failed", "stage", fe.Phase, "err", fe.Err, "rule", fe.Rule, "attempt", j.attempt, "will_retry", retry)
	ev, eerr := events.New(eventID(j.JobID, fmt.Sprintf("failed-%d", j.attempt)), events.TypeFailed, Source, j.Key, h.now(), data)
	if eerr != nil {
		return nil, err
	}
	return []events.Message{{Subject: events.SubjectFailed, Event: ev}}, err
}

// errorReport is the body of an error report: the failure event's data,
// and whether the report's own key had to be shortened to fit S3's limit
// (input_key always holds the whole key).
type errorReport struct {
	events.Failed
	ReportKeyShortened bool `json:"report_key_shortened,omitempty"`
}

// writeErrorReport writes the report at events.ErrorReportKey, in the input
// bucket, so an operator finds it with any S3 browser.
func (h *Handler) writeErrorReport(ctx context.Context, j *job, data events.Failed) {
	key, shortened := events.ErrorReportKey(j.Key)
	body, err := json.MarshalIndent(errorReport{Failed: data, ReportKeyShortened: shortened}, "", "  ")
	if err == nil {
		err = h.store.PutBytes(ctx, j.Bucket, key, body, "application/json", map[string]string{MetaJob: j.JobID})
	}
	if err != nil {
		j.log.Warn("error report not written", "report_key", key, "err", err)
	}
}

func (h *Handler) system(ctx context.Context) *events.SystemInfo {
	si := &events.SystemInfo{}
	si.Host, _ = os.Hostname()
	if free, err := freeSpace(h.cfg.ScratchDir); err == nil {
		si.ScratchFreeBytes = free
	}
	vctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	si.QemuImgVersion, _ = h.qemu.Version(vctx)
	return si
}

var eventNamespace = uuid.MustParse("a5c1d0e4-2b7f-4a8e-8d51-0f3c9e6b7d20")

// eventID is deterministic so that a redelivered job that gets as far
// again republishes the same id, and JetStream drops the copy.
func eventID(jobID, outcome string) string {
	return uuid.NewSHA1(eventNamespace, []byte(jobID+"/"+outcome)).String()
}

func freeSpace(dir string) (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}

func isNoSpace(err error) bool { return errors.Is(err, syscall.ENOSPC) }
