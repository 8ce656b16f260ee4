package convert

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
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
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/inspect"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
)

// Source is the CloudEvents source of convert's results.
const Source = "/imagepipe/convert"

// Metadata keys set on every output object.
const (
	MetaOutput = "imagepipe-output" // marks outputs so ingest never takes them in
	MetaJob    = "imagepipe-job"
	MetaSource = "imagepipe-source"
	MetaSHA256 = "imagepipe-sha256"
	MetaInput  = "imagepipe-input-format"
	MetaVSize  = "imagepipe-virtual-size"
	MetaFormat = "imagepipe-format" // on an upload: the output format wanted
)

// Storage is the part of object storage convert uses.
type Storage interface {
	Open(ctx context.Context, bucket, key, versionID, etag string) (io.ReadCloser, objstore.Object, error)
	UploadFile(ctx context.Context, bucket, key, path string, meta map[string]string, progress io.Reader) (objstore.Object, error)
	Stat(ctx context.Context, bucket, key string) (objstore.Object, error)
	PutBytes(ctx context.Context, bucket, key string, body []byte, contentType string, meta map[string]string) error
}

// QemuImg is the part of qemu-img convert uses.
type QemuImg interface {
	Info(ctx context.Context, path, format string) (qemuimg.InfoResult, error)
	Convert(ctx context.Context, src, srcFormat, dst, dstFormat string, onProgress func(percent float64)) error
	Version(ctx context.Context) (string, error)
}

// Reporter records state transitions and live progress. Both are hints for
// people watching: a failure to report never fails the job.
type Reporter interface {
	Set(ctx context.Context, st events.Status) error
	Progress(p events.Progress) error
}

// Handler converts one job.
type Handler struct {
	cfg    Config
	store  Storage
	qemu   QemuImg
	report Reporter
	log    *slog.Logger
	now    func() time.Time
}

// New returns a handler.
func New(cfg Config, store Storage, qemu QemuImg, report Reporter, log *slog.Logger) *Handler {
	if cfg.ScratchDir == "" {
		cfg.ScratchDir = os.TempDir()
	}
	return &Handler{cfg: cfg, store: store, qemu: qemu, report: report, log: log, now: time.Now}
}

// job is one conversion in flight: the queued job plus what the stages
// learn along the way.
type job struct {
	events.ConvertJob
	attempt, maxAttempts int
	started              time.Time
	log                  *slog.Logger
	dir                  string
	input                string
	output               string
	inputSize            int64
	format               inspect.Format
	virtualSize          int64
	outFormat            string
	outKey               string
	outSize              int64
	sha256               string // of the output
	sha256In             string // of the object as uploaded
	codec                string // compression the upload came in
	meta                 map[string]string
}

// Handle runs a job through every stage and returns its result event. On
// failure it returns the failed event and the classified error together:
// the event says whether the runtime will retry.
func (h *Handler) Handle(ctx context.Context, cj events.ConvertJob, attempt, maxAttempts int) ([]events.Message, error) {
	j := &job{
		ConvertJob:  cj,
		attempt:     attempt,
		maxAttempts: maxAttempts,
		started:     h.now(),
		log:         h.log.With("job", cj.JobID, "bucket", cj.Bucket, "key", cj.Key),
		outFormat:   h.outputFormat(cj),
	}
	j.outKey = cj.Key + "." + j.outFormat

	if h.alreadyDone(ctx, j) {
		j.log.Info("output of this job already uploaded; reporting it again", "stage", "ready", "output_key", j.outKey)
		return h.succeed(ctx, j)
	}
	err := h.run(ctx, j)
	if errors.Is(err, errSuperseded) {
		j.log.Info("object changed since it was queued; its newer upload has its own job", "stage", "download")
		return nil, nil
	}
	if err != nil {
		return h.fail(ctx, j, err)
	}
	return h.succeed(ctx, j)
}

var errSuperseded = errors.New("object superseded")

// alreadyDone reports whether a previous delivery of this job uploaded its
// output but died before the result was published: the output is then
// reported again instead of converted again.
func (h *Handler) alreadyDone(ctx context.Context, j *job) bool {
	obj, err := h.store.Stat(ctx, h.cfg.OutputBucket, j.outKey)
	if err != nil || obj.Metadata[MetaJob] != j.JobID || obj.Metadata[MetaSHA256] == "" {
		return false
	}
	vsize, err := strconv.ParseInt(obj.Metadata[MetaVSize], 10, 64)
	if err != nil {
		return false
	}
	j.sha256, j.outSize, j.virtualSize = obj.Metadata[MetaSHA256], obj.Size, vsize
	j.format = inspect.Format(obj.Metadata[MetaInput])
	j.inputSize = j.Size
	return true
}

func (h *Handler) outputFormat(cj events.ConvertJob) string {
	if cj.OutputFormat != "" {
		return cj.OutputFormat
	}
	return h.cfg.OutputFormat
}

func (h *Handler) run(ctx context.Context, j *job) error {
	dir, err := os.MkdirTemp(h.cfg.ScratchDir, "imagepipe-job-")
	if err != nil {
		return failure.Retryable(events.PhaseDownload, fmt.Errorf("create scratch dir: %w", err), "check IMAGEPIPE_SCRATCH_DIR exists and is writable")
	}
	// Scratch paths never derive from the object key, which the uploader
	// chose; and they never outlive the job.
	defer os.RemoveAll(dir)
	j.dir = dir
	j.input = filepath.Join(dir, "input")
	j.output = filepath.Join(dir, "output."+j.outFormat)

	for _, stage := range []func(context.Context, *job) error{
		h.download, h.inspect, h.convert, h.verify, h.upload,
	} {
		if err := stage(ctx, j); err != nil {
			return err
		}
	}
	return nil
}

func (h *Handler) setState(ctx context.Context, j *job, state events.State, percent float64) {
	st := events.Status{
		Bucket: j.Bucket, Key: j.Key, JobID: j.JobID, State: state, Percent: percent,
		InputFormat: string(j.format), Attempt: j.attempt, UpdatedAt: h.now().UTC(),
	}
	if state == events.StateReady {
		st.OutputBucket, st.OutputKey = h.cfg.OutputBucket, j.outKey
	}
	if err := h.report.Set(ctx, st); err != nil {
		j.log.Warn("status not recorded", "state", state, "err", err)
	}
}

func (h *Handler) inspect(ctx context.Context, j *job) error {
	h.setState(ctx, j, events.StateInspecting, 0)
	j.log.Info("inspecting", "stage", events.PhaseInspect)
	lim := inspect.Limits{MaxVirtualSize: h.cfg.MaxVirtualSize}
	rep, err := inspect.InspectFile(j.input, lim)
	if err != nil {
		return classifyInspect(err)
	}
	j.format = rep.Format
	if err := inspect.CheckExtension(rep, keyForExtension(j.Key, j.codec)); err != nil {
		return classifyInspect(err)
	}
	if rep.Format == inspect.OVA {
		return failure.Refused(events.PhaseInspect, "ova-unsupported", errors.New("OVA archives are not converted yet"), "upload the VMDK disks inside the OVA one by one")
	}
	info, err := h.qemu.Info(ctx, j.input, string(rep.Format))
	if err != nil {
		return classifyQemu(events.PhaseInspect, err, rep.Format)
	}
	vsize, err := inspect.CheckQemuInfo(rep, info.JSON, j.input, lim)
	if err != nil {
		return classifyInspect(err)
	}
	j.virtualSize = vsize
	free, err := freeSpace(j.dir)
	if err == nil && free < j.virtualSize {
		return failure.Retryable(events.PhaseInspect,
			fmt.Errorf("scratch space too small: the image needs up to %d bytes, %d are free", j.virtualSize, free),
			"free space in IMAGEPIPE_SCRATCH_DIR, lower IMAGEPIPE_MAX_CONCURRENT_JOBS, or point IMAGEPIPE_SCRATCH_DIR at a larger disk")
	}
	return nil
}

func (h *Handler) convert(ctx context.Context, j *job) error {
	h.setState(ctx, j, events.StateConverting, 0)
	j.log.Info("converting", "stage", events.PhaseConvert, "format", j.format, "virtual_size", j.virtualSize, "to", j.outFormat)
	ctx, cancel := context.WithTimeout(ctx, h.cfg.convertTimeout(j.virtualSize))
	defer cancel()
	meter := h.newMeter(ctx, j, events.PhaseConvert, events.StateConverting, j.virtualSize)
	err := h.qemu.Convert(ctx, j.input, string(j.format), j.output, j.outFormat, meter.percent)
	if err != nil {
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return failure.Permanent(events.PhaseConvert, fmt.Errorf("qemu-img convert took longer than %s", h.cfg.convertTimeout(j.virtualSize)),
				"raise IMAGEPIPE_CONVERT_TIMEOUT_PER_GIB if the disk is healthy and the scratch disk slow")
		}
		return classifyQemu(events.PhaseConvert, err, j.format)
	}
	return nil
}

func (h *Handler) verify(ctx context.Context, j *job) error {
	j.log.Info("verifying", "stage", events.PhaseVerify)
	st, err := os.Stat(j.output)
	if err != nil {
		return failure.Retryable(events.PhaseVerify, fmt.Errorf("output missing after conversion: %w", err), "")
	}
	j.outSize = st.Size()
	if j.outFormat == "raw" && j.outSize != j.virtualSize {
		return failure.Permanent(events.PhaseVerify, fmt.Errorf("raw output is %d bytes, the image's virtual size is %d", j.outSize, j.virtualSize), "")
	}
	// The output is re-inspected as if it were an upload: it must be the
	// target format and reference no other file.
	lim := inspect.Limits{MaxVirtualSize: h.cfg.MaxVirtualSize}
	rep, err := inspect.InspectFile(j.output, lim)
	if err != nil {
		return failure.Permanent(events.PhaseVerify, fmt.Errorf("output failed re-inspection: %w", err), "")
	}
	if string(rep.Format) != j.outFormat && !(j.outFormat == "raw") {
		return failure.Permanent(events.PhaseVerify, fmt.Errorf("output is %s, expected %s", rep.Format, j.outFormat), "")
	}
	if j.outFormat != "raw" {
		info, err := h.qemu.Info(ctx, j.output, j.outFormat)
		if err != nil {
			return failure.Permanent(events.PhaseVerify, fmt.Errorf("output failed re-inspection: %w", err), "")
		}
		if _, err := inspect.CheckQemuInfo(rep, info.JSON, j.output, lim); err != nil {
			return failure.Permanent(events.PhaseVerify, fmt.Errorf("output failed re-inspection: %w", err), "")
		}
	}
	sum, err := fileSHA256(j.output)
	if err != nil {
		return failure.Retryable(events.PhaseVerify, err, "")
	}
	j.sha256 = sum
	return nil
}

func (h *Handler) upload(ctx context.Context, j *job) error {
	h.setState(ctx, j, events.StateUploading, 0)
	j.log.Info("uploading", "stage", events.PhaseUpload, "output_bucket", h.cfg.OutputBucket, "output_key", j.outKey, "size", j.outSize)
	meta := map[string]string{
		MetaOutput: "true",
		MetaJob:    j.JobID,
		MetaSource: j.Bucket + "/" + j.Key,
		MetaSHA256: j.sha256,
		MetaInput:  string(j.format),
		MetaVSize:  strconv.FormatInt(j.virtualSize, 10),
	}
	// Uploading to the same key on a redelivery replaces the object whole:
	// S3 never exposes a half-written one, so a retry cannot corrupt it.
	meter := h.newMeter(ctx, j, events.PhaseUpload, events.StateUploading, j.outSize)
	if _, err := h.store.UploadFile(ctx, h.cfg.OutputBucket, j.outKey, j.output, meta, meter); err != nil {
		if objstore.IsPermanent(err) {
			return failure.Permanent(events.PhaseUpload, err, "check the output bucket exists and the converter may write to it")
		}
		return failure.Retryable(events.PhaseUpload, err, "")
	}
	return nil
}

func (h *Handler) succeed(ctx context.Context, j *job) ([]events.Message, error) {
	h.setState(ctx, j, events.StateReady, 100)
	took := h.now().Sub(j.started)
	data := events.Converted{
		JobID: j.JobID, InputBucket: j.Bucket, InputKey: j.Key, InputFormat: string(j.format),
		InputSize: j.inputSize, VirtualSize: j.virtualSize,
		OutputBucket: h.cfg.OutputBucket, OutputKey: j.outKey, OutputFormat: j.outFormat,
		OutputSize: j.outSize, SHA256: j.sha256, DurationMS: took.Milliseconds(), Attempt: j.attempt,
	}
	ev, err := events.New(eventID(j.JobID, "converted"), events.TypeConverted, Source, j.Key, h.now(), data)
	if err != nil {
		return nil, failure.Permanent(events.PhasePublish, err, "")
	}
	j.log.Info("converted", "stage", "ready", "output_key", j.outKey, "sha256", j.sha256, "duration", took)
	return []events.Message{{Subject: events.SubjectConverted, Event: ev}}, nil
}

func (h *Handler) fail(ctx context.Context, j *job, err error) ([]events.Message, error) {
	fe, ok := failure.As(err)
	if !ok {
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
	}
	if retry {
		// Still QUEUED: it comes back after the back-off.
		st.State = events.StateQueued
	}
	if serr := h.report.Set(ctx, st); serr != nil {
		j.log.Warn("status not recorded", "err", serr)
	}
	if !retry {
		h.writeErrorReport(ctx, j, data)
	}
	j.log.Warn("failed", "stage", fe.Phase, "err", fe.Err, "rule", fe.Rule, "attempt", j.attempt, "will_retry", retry)
	ev, eerr := events.New(eventID(j.JobID, fmt.Sprintf("failed-%d", j.attempt)), events.TypeFailed, Source, j.Key, h.now(), data)
	if eerr != nil {
		return nil, err
	}
	return []events.Message{{Subject: events.SubjectFailed, Event: ev}}, err
}

// ErrorReportKey is where the report of a failed input is written, in the
// input bucket, so an operator finds it with any S3 browser.
func ErrorReportKey(inputKey string) string { return "errors/" + inputKey + ".error.json" }

func (h *Handler) writeErrorReport(ctx context.Context, j *job, data events.Failed) {
	body, err := json.MarshalIndent(data, "", "  ")
	if err == nil {
		err = h.store.PutBytes(ctx, j.Bucket, ErrorReportKey(j.Key), body, "application/json", map[string]string{MetaJob: j.JobID})
	}
	if err != nil {
		j.log.Warn("error report not written", "err", err)
	}
}

func (h *Handler) system(ctx context.Context) *events.SystemInfo {
	si := &events.SystemInfo{}
	si.Host, _ = os.Hostname()
	if free, err := freeSpace(h.cfg.ScratchDir); err == nil {
		si.ScratchFreeBytes = free
	}
	vctx, cancel := context.WithTimeout(ctx, 5*time.Second)
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

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("hash %s: %w", filepath.Base(path), err)
	}
	defer f.Close()
	hsh := sha256.New()
	if _, err := io.Copy(hsh, f); err != nil {
		return "", fmt.Errorf("hash %s: %w", filepath.Base(path), err)
	}
	return hex.EncodeToString(hsh.Sum(nil)), nil
}

func freeSpace(dir string) (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Bavail) * int64(st.Bsize), nil
}

func isNoSpace(err error) bool { return errors.Is(err, syscall.ENOSPC) }
