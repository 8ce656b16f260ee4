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
	"syscall"
	"time"

	"github.com/google/uuid"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/dedup"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/inspect"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
	"github.com/imagepipe/imagepipe/internal/scratch"
	"github.com/imagepipe/imagepipe/internal/status"
)

// Storage is the part of object storage convert uses.
type Storage interface {
	Open(ctx context.Context, bucket, key, versionID, etag string) (io.ReadCloser, objstore.Object, error)
	// Upload, UploadGrowing and Copy write an output only if guard, run
	// just before the write completes, allows it (see objstore/commit.go).
	Upload(ctx context.Context, bucket, key string, f objstore.File, meta map[string]string, progress io.Reader, guard objstore.Guard) (objstore.Object, error)
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
	Measure(ctx context.Context, path, format string) (int64, error)
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
	// diskSpace reports the scratch file system's free and total bytes;
	// tests shrink it.
	diskSpace func(dir string) (free, total int64, err error)
}

// New returns a handler. dd may be nil: content de-duplication is then
// off. New does no I/O; the runtime calls Sweep once at start.
func New(cfg Config, store Storage, qemu QemuImg, report Reporter, dd Deduper, log *slog.Logger) *Handler {
	cfg.ScratchDir = cfg.Scratch()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Handler{cfg: cfg, store: store, qemu: qemu, report: report, dedup: dd, log: log, now: time.Now,
		streamAbove: objstore.PartSize, diskSpace: scratch.DiskSpace}
}

// Sweep reclaims what the jobs of processes that died left behind: their
// scratch, and the output uploads they started and never finished. A
// replica killed mid-job left its scratch behind; starting up is the first
// chance to reclaim it, and every job sweeps again before it starts.
func (h *Handler) Sweep(ctx context.Context) {
	h.sweep(ctx, h.log)
}

func (h *Handler) sweep(ctx context.Context, log *slog.Logger) {
	removed, uploads, unnamed := scratch.SweepJobDirs(h.cfg.ScratchDir, h.now())
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
func (h *Handler) unnamedUploads(ctx context.Context, unnamed []scratch.NotedUpload, log *slog.Logger) []scratch.NotedUpload {
	const skew = 2 * time.Second
	live := scratch.LiveUploadIDs(h.cfg.ScratchDir)
	var out []scratch.NotedUpload
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
				out = append(out, scratch.NotedUpload{Bucket: u.Bucket, Key: u.Key, UploadID: p.UploadID})
			}
		}
	}
	return out
}

// job is one delivery of a queued job: what it is, and the views of
// storage, status and de-duplication through which its requests are
// counted. What the stages learn they return as values; the job itself
// is only told, once each, the plan's output format and its scratch dir.
type job struct {
	events.ConvertJob
	attempt, maxAttempts int
	started              time.Time
	log                  *slog.Logger
	reqs                 *requests
	store                Storage
	report               Reporter
	dedup                Deduper // nil when de-duplication is off
	outFormat            string  // decided by the plan
	dir                  string  // the job's scratch dir, once work made it
	last                 lastStatus
}

// newJob starts a delivery, the attempt-th of maxAttempts.
func (h *Handler) newJob(cj events.ConvertJob, attempt, maxAttempts int) *job {
	reqs := &requests{}
	j := &job{
		ConvertJob:  cj,
		attempt:     attempt,
		maxAttempts: maxAttempts,
		started:     h.now(),
		log:         h.log.With("job", cj.JobID, "bucket", cj.Bucket, "key", cj.Key),
		reqs:        reqs,
		store:       countedStore{h.store, reqs},
		report:      countedReporter{h.report, reqs},
	}
	if h.dedup != nil {
		j.dedup = countedDeduper{h.dedup, reqs}
	}
	return j
}

// ended logs the job's requests, the results it hands the runtime to
// publish among them.
func (j *job) ended(published int) {
	for range published {
		j.reqs.add(reqPublish)
	}
	j.reqs.log(j.log)
}

// outcome is what a job produced: what its result events and its status
// record say. A stage that fails returns what was learnt before it failed
// (the upload's format, once inspected), for the failure to report.
type outcome struct {
	format      inspect.Format // of the upload (ova for an appliance)
	inputSize   int64
	sha256In    string // of the object as uploaded, where it was read
	disks       []disk
	duplicateOf string // "bucket/key" of the earlier output this one copies
	// earlier: an earlier delivery of this job made the outputs; this one
	// only records and reports them, and must not log a conversion.
	earlier bool
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
	crc64nvme   string // base64, as S3 writes it
	zeroBytes   int64  // copied from the zero object instead of sent
}

// Handle runs a job through every stage and returns its result events. On
// failure it returns the failed event and the classified error together:
// the event says whether the runtime will retry.
func (h *Handler) Handle(ctx context.Context, cj events.ConvertJob, attempt, maxAttempts int) (out []events.Message, err error) {
	// A job queued again after its message was lost counts on from the
	// deliveries it had, and has a fresh set of its own.
	j := h.newJob(cj, cj.PriorAttempts+attempt, cj.PriorAttempts+maxAttempts)
	defer func() { j.ended(len(out)) }()
	var cur *events.Status
	if st, err := j.report.Get(ctx, j.Bucket, j.Key); err == nil {
		cur = &st
	}
	if cur != nil && cur.JobID == j.JobID && cur.State == events.StateCancelled {
		j.log.Info("cancelled by an operator before it started", "stage", "cancelled")
		return h.fail(ctx, j, "", failure.Refused(events.PhaseDownload, events.RuleCancelled, failure.ErrCancelled, ""))
	}
	if cur != nil && failedForGood(j, *cur) {
		return h.failedAgain(j, *cur)
	}
	p := h.plan(ctx, j, cur)
	j.outFormat = p.outFormat
	switch p.action {
	case actDone:
		j.log.Info("output of this job already uploaded; reporting it again", "stage", "ready", "output_key", p.outKey)
		return h.succeed(ctx, j, p.done)
	case actLeave:
		// Not through fail: a status written now would take the record
		// over from the delivery that is doing the work.
		j.log.Info("an earlier delivery of this job is still running; leaving the job to it", "stage", "queued",
			"running_attempt", cur.Attempt, "running_state", cur.State)
		return nil, p.err
	}
	res, err := h.work(ctx, j, p)
	if errors.Is(err, errSuperseded) {
		j.log.Info("object changed since it was queued; its newer upload has its own job", "stage", "download")
		h.handBack(ctx, j)
		return nil, nil
	}
	if err != nil {
		return h.fail(ctx, j, res.format, err)
	}
	return h.succeed(ctx, j, res)
}

var errSuperseded = errors.New("object superseded")

// Exhausted reports a job no delivery finished: each ended with its
// replica gone (killed, out of memory), so no attempt could say why. It
// fails for good; `imagepipe reconvert` starts it again.
func (h *Handler) Exhausted(ctx context.Context, cj events.ConvertJob, deliveries int) []events.Message {
	j := h.newJob(cj, deliveries, deliveries)
	out, _ := h.fail(ctx, j, "", failure.Permanent(events.PhaseConvert,
		fmt.Errorf("the converter stopped %d times while working on this upload and never finished it", deliveries),
		"look for convert replicas that were killed or ran out of memory during its attempts; once that is fixed, run `imagepipe reconvert "+cj.Bucket+"/"+cj.Key+"`"))
	j.ended(len(out))
	return out
}

// work does what the plan says in a scratch dir of its own. Even a copy
// needs the dir: its upload is noted there, for the sweep that follows a
// process's death.
func (h *Handler) work(ctx context.Context, j *job, p plan) (outcome, error) {
	if p.action == actRefuse {
		return outcome{}, p.err
	}
	h.sweep(ctx, j.log)
	dir, release, err := scratch.NewJobDir(h.cfg.ScratchDir)
	if err != nil {
		return outcome{}, failure.Retryable(events.PhaseDownload, fmt.Errorf("create scratch dir: %w", err), "check IMAGEPIPE_SCRATCH_DIR exists and is writable")
	}
	// Scratch paths never derive from the object key, which the uploader
	// chose; and they never outlive the job, even one whose process died.
	defer release()
	j.dir = dir
	switch p.action {
	case actDuplicate:
		res, err := h.copyEarlier(ctx, j, p.outKey, p.earlier)
		if !errors.Is(err, errStale) {
			return res, err
		}
		// The earlier output went: on the way the job would have taken
		// without it.
		if rep, ok := h.rawUpload(ctx, j, p); ok {
			p.header = rep
			return h.copyRaw(ctx, j, p)
		}
	case actCopy:
		return h.copyRaw(ctx, j, p)
	}
	return h.convertUpload(ctx, j, p)
}

// convertUpload is the full way: download, inspect, then convert, verify
// and upload each disk.
func (h *Handler) convertUpload(ctx context.Context, j *job, p plan) (outcome, error) {
	in, err := h.download(ctx, j, h.track(j, ""))
	if err != nil {
		return outcome{}, err
	}
	if h.cfg.Dedup.Hash == dedup.HashSHA256 {
		// Only now is the content's hash known.
		if earlier, ok := h.findEarlier(ctx, j, p, h.contentKey(j, in.sha256)); ok {
			res, err := h.copyEarlier(ctx, j, p.outKey, earlier)
			res.sha256In = in.sha256
			if !errors.Is(err, errStale) {
				return res, err
			}
		}
	}
	rep, err := h.inspectUpload(ctx, j, in)
	res := outcome{format: rep.Format, inputSize: in.size, sha256In: in.sha256}
	if err != nil {
		return res, err
	}
	tr := h.track(j, rep.Format)
	if rep.Format == inspect.OVA {
		res.disks, err = h.convertOVA(ctx, j, tr, in)
		return res, err
	}
	d := disk{
		input:  in.path,
		output: filepath.Join(j.dir, "output."+j.outFormat),
		extKey: keyForExtension(j.Key, in.codec),
		format: rep.Format,
		outKey: p.outKey,
	}
	d, err = h.convertDisk(ctx, j, tr, d, rep)
	res.disks = []disk{d}
	return res, err
}

// inspectUpload reads the download's header and decides its format,
// never trusting the name or qemu-img's probing.
func (h *Handler) inspectUpload(ctx context.Context, j *job, in downloaded) (inspect.Report, error) {
	h.track(j, "").set(ctx, events.StateInspecting, 0)
	j.log.Info("inspecting", "stage", events.PhaseInspect)
	rep, err := inspect.InspectFile(in.path, h.limits())
	if err != nil {
		return inspect.Report{}, classifyInspect(err)
	}
	return rep, nil
}

func (h *Handler) limits() inspect.Limits {
	return h.cfg.InspectLimits()
}

// record writes a status that is a hint: a failure to record is logged,
// never the job's failure. A write the record refused as not forward means
// another delivery of this job is ahead, which is nothing to warn about.
func (h *Handler) record(ctx context.Context, j *job, st events.Status) {
	err := j.report.Set(ctx, st)
	switch {
	case errors.Is(err, status.ErrNotForward):
		j.log.Debug("status not moved: another delivery of this job is ahead", "state", st.State, "err", err)
	case err != nil:
		j.log.Warn("status not recorded", "state", st.State, "err", err)
	}
}

// finalStatus is the record of a job that succeeded.
func (h *Handler) finalStatus(j *job, res outcome) events.Status {
	st := events.Status{
		Bucket: j.Bucket, Key: j.Key, JobID: j.JobID, State: events.StateReady, Percent: 100,
		InputFormat: string(res.format), Attempt: j.attempt, UpdatedAt: h.now().UTC(),
	}
	if res.duplicateOf != "" {
		st.State = events.StateDuplicate
	}
	if len(res.disks) > 0 {
		st.OutputBucket, st.OutputKey = h.cfg.OutputBucket, res.disks[0].outKey
		if res.duplicateOf != "" {
			st.Message = "same content as " + res.duplicateOf
		}
	}
	return st
}

func (h *Handler) succeed(ctx context.Context, j *job, res outcome) ([]events.Message, error) {
	st := h.finalStatus(j, res)
	// The final state is what `imagepipe status` and `upload` wait for: if
	// it cannot be recorded, the job is delivered again, finds its output
	// in place and records it then.
	//
	// Write order: output, then its sha256 tag (complete), then READY here,
	// then the de-duplication record (remember), then the result event
	// (published by the runtime, which acknowledges the job last). Each
	// write only ever points at what the ones before it completed, so a
	// crash between any two leaves a state that heals: a tagged output
	// with no READY is reported again by the redelivery (alreadyDone) or,
	// if the job message is lost too, restored by reconcile from the
	// output; a lost de-duplication record costs one conversion; a result
	// lost before the ack is published again by the redelivery under the
	// same id. READY before the output would announce what may never
	// exist, and a de-duplication record before the tag would let another
	// upload copy an output that may be incomplete. A record that already holds this job
	// as finished (an earlier delivery whose ack was lost wrote it) stays
	// as it is: watchers see the image finish once.
	statusErr := j.report.Set(ctx, st)
	again := errors.Is(statusErr, status.ErrNotForward)
	if again {
		statusErr = nil
	}
	h.remember(ctx, j, res)
	took := h.now().Sub(j.started)
	var out []events.Message
	for _, d := range res.disks {
		data := events.Converted{
			JobID: j.JobID, InputBucket: j.Bucket, InputKey: j.Key, InputFormat: string(d.format),
			InputSize: res.inputSize, VirtualSize: d.virtualSize,
			OutputBucket: h.cfg.OutputBucket, OutputKey: d.outKey, OutputFormat: j.outFormat,
			OutputSize: d.outSize, SHA256: d.sha256, DurationMS: took.Milliseconds(), Attempt: j.attempt,
			DuplicateOf: res.duplicateOf, CRC64NVME: d.crc64nvme, ZeroFraction: d.zeroFraction(),
		}
		ev, err := events.New(eventID(j.JobID, "converted/"+d.member), events.TypeConverted, events.SourceConvert, j.Key, h.now(), data)
		if err != nil {
			return nil, failure.Permanent(events.PhasePublish, err, "")
		}
		out = append(out, events.Message{Subject: events.SubjectConverted, Event: ev})
		switch {
		case again:
			j.log.Info("already reported by an earlier delivery; result published again", "stage", "ready", "output_key", d.outKey)
			continue
		case res.earlier:
			j.log.Info("recorded as ready", "stage", "ready", "output_key", d.outKey, "sha256", d.sha256)
			continue
		}
		j.log.Info("converted", "stage", "ready", "output_key", d.outKey, "sha256", d.sha256, "duration", took)
	}
	if statusErr != nil {
		return out, failure.Retryable(events.PhasePublish, fmt.Errorf("record state %s: %w", st.State, statusErr), "")
	}
	return out, nil
}

// fail reports a job that failed; format is the upload's, where
// inspection got as far as knowing it.
func (h *Handler) fail(ctx context.Context, j *job, format inspect.Format, err error) ([]events.Message, error) {
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
		fe = failure.Refused(phase, events.RuleCancelled, failure.ErrCancelled, "upload the image again, or run `imagepipe reconvert`, to convert it after all")
		err = fe
	} else if !ok {
		fe = failure.Retryable(events.PhaseConvert, err, "")
		err = fe
	}
	retry := failure.WillRetry(err, j.attempt, j.maxAttempts)
	data := events.Failed{
		JobID: j.JobID, InputBucket: j.Bucket, InputKey: j.Key, InputFormat: string(format),
		Phase: fe.Phase, Message: fe.Err.Error(), Suggestion: fe.Suggestion, Rule: fe.Rule,
		Attempt: j.attempt, WillRetry: retry, DurationMS: h.now().Sub(j.started).Milliseconds(),
		System: h.system(ctx),
	}
	st := events.Status{
		Bucket: j.Bucket, Key: j.Key, JobID: j.JobID, State: events.StateFailed, Phase: fe.Phase,
		Message: data.Message, Suggestion: fe.Suggestion, Rule: fe.Rule, InputFormat: string(format), Attempt: j.attempt,
		UpdatedAt: h.now().UTC(),
	}
	switch {
	case cancelled:
		st.State = events.StateCancelled
	case retry:
		// Still QUEUED: it comes back after the back-off.
		st.State = events.StateQueued
	}
	// Write order: status, then error report, then the failure event
	// (published by the runtime). A retry records QUEUED before the job is
	// handed back for its back-off, so the record never says FAILED of a
	// job still to run; the report and the event only describe a status
	// already recorded, and losing either costs a description, not a job.
	h.record(ctx, j, st)
	if !retry && !cancelled {
		h.writeErrorReport(ctx, j, data)
	}
	j.log.Warn("failed", "stage", fe.Phase, "err", fe.Err, "rule", fe.Rule, "attempt", j.attempt, "will_retry", retry)
	id := failedEventID(j.JobID, j.attempt)
	if cancelled {
		// A job is cancelled once: every delivery that reports it (a term
		// lost brings another) says so under the same id.
		id = eventID(j.JobID, "cancelled")
	}
	ev, eerr := events.New(id, events.TypeFailed, events.SourceConvert, j.Key, h.now(), data)
	if eerr != nil {
		return nil, err
	}
	return []events.Message{{Subject: events.SubjectFailed, Event: ev}}, err
}

// failedEventID names the failure event of one attempt: each retry is
// news, and a later delivery that reports the same attempt again
// publishes the same id, which JetStream drops as a copy.
func failedEventID(jobID string, attempt int) string {
	return eventID(jobID, fmt.Sprintf("failed-%d", attempt))
}

// failedForGood reports whether cur says an earlier delivery of this very
// job message already failed it for good: the server hands the message out
// again when that delivery's term was lost (to a NATS restart or a leader
// change). A later upload of the same bytes has the same job id but starts
// again at attempt 1, and runs again.
func failedForGood(j *job, cur events.Status) bool {
	return cur.JobID == j.JobID && cur.State == events.StateFailed && j.attempt > cur.Attempt
}

// failedAgain answers such a delivery with the recorded failure, under the
// id the earlier delivery published it with, and nothing else: no stage
// runs twice, the record stays as it is, and watchers and chat see the
// failure once. If the first publish was lost, this one is the event.
// The record is the source, not the error report: that lies in the input
// bucket, where uploaders write.
func (h *Handler) failedAgain(j *job, st events.Status) ([]events.Message, error) {
	// Permanent, as it was: the runtime terminates the message again.
	fe := failure.Refused(st.Phase, st.Rule, errors.New(st.Message), st.Suggestion)
	data := events.Failed{
		JobID: j.JobID, InputBucket: j.Bucket, InputKey: j.Key, InputFormat: st.InputFormat,
		Phase: st.Phase, Message: st.Message, Suggestion: st.Suggestion, Rule: st.Rule,
		Attempt: st.Attempt, WillRetry: false,
	}
	j.log.Info("failed for good by an earlier delivery; failure published again", "stage", st.Phase,
		"rule", st.Rule, "failed_attempt", st.Attempt, "attempt", j.attempt)
	ev, err := events.New(failedEventID(j.JobID, st.Attempt), events.TypeFailed, events.SourceConvert, j.Key, h.now(), data)
	if err != nil {
		return nil, fe
	}
	return []events.Message{{Subject: events.SubjectFailed, Event: ev}}, fe
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
		err = j.store.PutBytes(ctx, j.Bucket, key, body, "application/json", map[string]string{events.MetaJob: j.JobID})
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
	free, _, err := scratch.DiskSpace(dir)
	return free, err
}

func isNoSpace(err error) bool { return errors.Is(err, syscall.ENOSPC) }
