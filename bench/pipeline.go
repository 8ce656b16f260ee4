package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/nats-io/nats.go"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
	"github.com/imagepipe/imagepipe/internal/scratch"
	"github.com/imagepipe/imagepipe/test/stack"
)

// Config sizes a run; every field has an environment knob in
// cmd/benchreport so that the run can be scaled down.
type Config struct {
	Dir    string // work space: images, MinIO data, scratch, all on one disk
	Binary string // the imagepipe command
	Reps   int    // repetitions of each sparse image and of each small image; medians are reported

	LargeVirtual, LargeData           int64
	VerySparseVirtual, VerySparseData int64
	OverheadImages                    int
	BurstImages                       int
	BurstConcurrency                  int
	MemorySizes                       []int64
	MemoryData                        int64

	Logf func(format string, args ...any)
}

// Runner runs the scenarios against one stack.
type Runner struct {
	cfg     Config
	st      *stack.Stack
	results *stack.Results
	store   *objstore.Store

	mu       sync.Mutex
	notified map[string]time.Time                  // input key → when its notification reached NATS
	entered  map[string]map[events.State]time.Time // input key → when convert first reported each state
}

// convertConcurrency is the replica's default IMAGEPIPE_MAX_CONCURRENT_JOBS.
const convertConcurrency = 2

// NewRunner starts the stack the scenarios share.
func NewRunner(ctx context.Context, cfg Config) (*Runner, error) {
	st, err := stack.Start(ctx, stack.Config{
		Dir: filepath.Join(cfg.Dir, "stack"), Binary: cfg.Binary, Compress: true,
		Env: map[string]string{
			// Every repetition uploads the same bytes again; it must be
			// converted again, not copied from the first.
			"IMAGEPIPE_DEDUP":               "off",
			"IMAGEPIPE_LOG_LEVEL":           "info",
			"IMAGEPIPE_LOG_FORMAT":          "json",
			"IMAGEPIPE_MAX_CONCURRENT_JOBS": strconv.Itoa(convertConcurrency),
		},
	})
	if err != nil {
		return nil, err
	}
	r := &Runner{cfg: cfg, st: st, notified: map[string]time.Time{}}
	if err := st.WaitConsumers(ctx); err != nil {
		st.Close()
		return nil, err
	}
	if r.results, err = st.CollectResults(ctx, "bench"); err != nil {
		st.Close()
		return nil, err
	}
	access, secret := st.Credentials()
	if r.store, err = objstore.New(objstore.Config{Endpoint: st.S3Endpoint(), AccessKey: access, SecretKey: secret}); err != nil {
		r.Close()
		return nil, err
	}
	if _, err := st.NC.Subscribe(events.SubjectS3Events, r.noteNotification); err != nil {
		r.Close()
		return nil, err
	}
	if err := r.warmUp(ctx); err != nil {
		r.Close()
		return nil, fmt.Errorf("warm-up: %w", err)
	}
	return r, nil
}

// warmUp sends one mostly empty image through the pipeline before anything
// is timed. Its upload writes the output bucket's zero object, which any
// installation that has converted an image already has; otherwise the
// first timed run would pay for it and its baseline would not.
func (r *Runner) warmUp(ctx context.Context) error {
	img, err := stack.Make(ctx, filepath.Join(r.cfg.Dir, "warmup"), "warmup", stack.Spec{Kind: stack.KindQcow2, Virtual: 512 << 20, Data: 1 << 20, Seed: 1}, false)
	if err != nil {
		return err
	}
	defer os.Remove(img.Path)
	if _, err := r.through(ctx, img, "bench/warmup/"+img.Key); err != nil {
		return err
	}
	return r.removeAll(ctx, "bench/warmup/")
}

// Stages of one trip through the pipeline, as the report names them.
var Stages = []string{"notification", "queue", "download", "inspect", "convert", "verify", "upload", "result"}

// convertStages are the stage attributes convert logs as a job enters
// each stage, in order.
var convertStages = []string{"download", "inspect", "convert", "verify", "upload", "ready"}

// stages splits a trip by the lines convert logs as the job enters each
// stage (by its own clock, the same machine's).
func (r *Runner) stages(key string, t trip) ([]time.Duration, error) {
	entered, err := r.logMarks(key)
	if err != nil {
		return nil, err
	}
	return r.stagesFrom(key, t, entered), nil
}

// stagesFrom splits a trip by the marks logMarksOf read for its key.
func (r *Runner) stagesFrom(key string, t trip, entered map[string]time.Time) []time.Duration {
	r.mu.Lock()
	n := r.notified[key]
	r.mu.Unlock()
	marks := []time.Time{t.uploaded, n}
	for _, st := range convertStages {
		marks = append(marks, entered[st])
	}
	marks = append(marks, t.result.At)
	out := make([]time.Duration, len(Stages))
	for i := range out {
		if !marks[i].IsZero() && !marks[i+1].IsZero() {
			out[i] = marks[i+1].Sub(marks[i])
		}
	}
	return out
}

// logMarks reads convert's JSON log for the first line of each stage of
// the job on key.
func (r *Runner) logMarks(key string) (map[string]time.Time, error) {
	marks, err := r.logMarksOf([]string{key})
	return marks[key], err
}

// logMarksOf reads convert's JSON log once for the first line of each
// stage of the jobs on keys: key → stage → when.
func (r *Runner) logMarksOf(keys []string) (map[string]map[string]time.Time, error) {
	marks := make(map[string]map[string]time.Time, len(keys))
	for _, k := range keys {
		marks[k] = map[string]time.Time{}
	}
	f, err := os.Open(r.st.Procs["convert"].LogPath())
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var line struct {
			Time  time.Time `json:"time"`
			Key   string    `json:"key"`
			Stage string    `json:"stage"`
		}
		if json.Unmarshal(sc.Bytes(), &line) != nil || line.Stage == "" {
			continue
		}
		m, ok := marks[line.Key]
		if !ok {
			continue
		}
		if _, seen := m[line.Stage]; !seen {
			m[line.Stage] = line.Time
		}
	}
	return marks, sc.Err()
}

func (r *Runner) noteNotification(m *nats.Msg) {
	at := time.Now()
	n, err := events.ParseNotification(m.Data)
	if err != nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, rec := range n.Records {
		if _, seen := r.notified[rec.Key]; !seen {
			r.notified[rec.Key] = at
		}
	}
}

func (r *Runner) notifiedAt(key string) (time.Time, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	t, ok := r.notified[key]
	return t, ok
}

// Close stops the stack.
func (r *Runner) Close() {
	if r.results != nil {
		r.results.Stop()
	}
	r.st.Close()
}

func (r *Runner) logf(format string, args ...any) {
	if r.cfg.Logf != nil {
		r.cfg.Logf(format, args...)
	}
}

// trip is one image through the pipeline.
type trip struct {
	uploaded time.Time     // the upload completed
	notify   time.Duration // upload complete → notification on NATS
	e2e      time.Duration // upload complete → result event
	cpu      cpuTime       // used while the pipeline worked on it
	result   stack.Result
}

// through uploads img under key and waits for its result.
func (r *Runner) through(ctx context.Context, img stack.Image, key string) (trip, error) {
	img.Key = key
	settleDisk()
	at, err := r.st.Upload(ctx, img)
	if err != nil {
		return trip{}, err
	}
	cpu0 := readCPU(r.st.MinIOPid())
	res, err := r.await(ctx, key)
	if err != nil {
		return trip{}, err
	}
	t := trip{uploaded: at, e2e: res.At.Sub(at), cpu: readCPU(r.st.MinIOPid()).sub(cpu0), result: res}
	if n, ok := r.notifiedAt(key); ok {
		t.notify = n.Sub(at)
	}
	return t, nil
}

// await returns the final result for key, which must be a conversion.
func (r *Runner) await(ctx context.Context, key string) (stack.Result, error) {
	var found stack.Result
	var retried *events.Failed
	err := r.results.Wait(ctx, func(rs []stack.Result) bool {
		for _, x := range rs {
			if x.Key != key {
				continue
			}
			if x.Failed != nil && x.Failed.WillRetry && retried == nil {
				retried = x.Failed
			}
			if x.Final() {
				found = x
				return true
			}
		}
		return false
	})
	if err != nil {
		return found, fmt.Errorf("no result for %s: %w", key, err)
	}
	// A time that holds a retry's back-off is not the pipeline's: the run
	// stops rather than report it.
	if retried != nil {
		return found, fmt.Errorf("%s was tried again after failing in %s (%s); fix what failed and run the bench again", key, retried.Phase, retried.Message)
	}
	if found.Failed != nil {
		return found, fmt.Errorf("%s failed in %s: %s", key, found.Failed.Phase, found.Failed.Message)
	}
	return found, nil
}

// qemuConvert runs qemu-img convert as convert runs it (less the resource
// limits), and reports how long it took.
func qemuConvert(ctx context.Context, src, format, dst string, flags ...string) (time.Duration, error) {
	start := time.Now()
	args := append(append([]string{"convert", "-p"}, flags...), "-f", format, "-O", "raw", "-S", "4k", "--", src, dst)
	out, err := exec.CommandContext(ctx, "qemu-img", args...).CombinedOutput()
	took := time.Since(start)
	if err != nil {
		return 0, fmt.Errorf("qemu-img convert %s: %v\n%.500s", src, err, out)
	}
	return took, nil
}

// SparseImage compares the pipeline with the sequential baseline on one
// sparse image: the large one, or the very sparse one.
type SparseImage struct {
	Name          string
	Virtual, Data int64
	Baseline      string
	Pipeline      []time.Duration // upload complete → result event
	// The same with IMAGEPIPE_STREAM_OUTPUT=false: the output uploaded
	// once qemu-img is done, not while it writes.
	AfterConversion []time.Duration
	Notify          []time.Duration   // of which, until MinIO's notification reached NATS
	Stages          [][]time.Duration // per stage (see Stages), per run
	Sequential      []time.Duration   // baseline: download, convert, upload one after the other
	SeqStages       [3][]time.Duration
	Bare            [3][]time.Duration // download, qemu-img convert, upload as convert does each
	// CPU used by the machine and by MinIO, while the pipeline ran and
	// while the bare upload ran.
	PipelineCPU, BareUploadCPU []cpuTime
}

// bigVHDX makes a VHDX of the given virtual size holding data bytes of
// patterned writes spread over the disk, with qemu-img and qemu-io.
func bigVHDX(ctx context.Context, path string, virtual, data int64) error {
	if out, err := exec.CommandContext(ctx, "qemu-img", "create", "-q", "-f", "vhdx", path, strconv.FormatInt(virtual, 10)).CombinedOutput(); err != nil {
		return fmt.Errorf("qemu-img create: %v\n%s", err, out)
	}
	const chunk = 64 << 20
	n := max(data/chunk, 1)
	stride := virtual / n
	args := []string{"-f", "vhdx"}
	for i := range n {
		args = append(args, "-c", fmt.Sprintf("write -P 0x%02x %d %d", 1+i%254, (i*stride)&^(1<<20-1), min(chunk, data)))
	}
	if out, err := exec.CommandContext(ctx, "qemu-io", append(args, path)...).CombinedOutput(); err != nil {
		return fmt.Errorf("qemu-io: %v\n%s", err, out)
	}
	return nil
}

// RunSparse converts a sparse image of virtual bytes with data bytes of
// data through the pipeline, the sequential baseline and the bare stages,
// Reps times each, interleaved so that a change in the machine's load
// touches all three alike. name tells its runs and keys apart.
func (r *Runner) RunSparse(ctx context.Context, name string, virtual, data int64) (*SparseImage, error) {
	p := &SparseImage{Name: name, Virtual: virtual, Data: data}
	dir := filepath.Join(r.cfg.Dir, name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	src := filepath.Join(dir, "large.vhdx")
	if err := bigVHDX(ctx, src, p.Virtual, p.Data); err != nil {
		return nil, err
	}
	st, err := os.Stat(src)
	if err != nil {
		return nil, err
	}
	img := stack.Image{Path: src, Size: st.Size(), Format: "vhdx"}
	mc, _ := exec.LookPath("mc")
	p.Baseline = "minio-go FGetObject and FPutObject with default options (the download one stream; the upload in parts of minio-go's automatic size, 4 at a time, each signed with its SHA-256 over plain HTTP)"
	if mc != "" {
		p.Baseline = "mc cp down, qemu-img convert, mc cp up (" + mc + ")"
	}

	for rep := range r.cfg.Reps {
		key := fmt.Sprintf("bench/"+name+"/%d/large.vhdx", rep)
		t, err := r.through(ctx, img, key)
		if err != nil {
			return nil, err
		}
		p.Pipeline = append(p.Pipeline, t.e2e)
		p.PipelineCPU = append(p.PipelineCPU, t.cpu)
		p.Notify = append(p.Notify, t.notify)
		st, err := r.stages(key, t)
		if err != nil {
			return nil, err
		}
		if p.Stages == nil {
			p.Stages = make([][]time.Duration, len(st))
		}
		for i := range st {
			p.Stages[i] = append(p.Stages[i], st[i])
		}
		r.logf("%s rep %d: pipeline %s (notification %s)", name, rep, t.e2e.Round(time.Millisecond), t.notify.Round(time.Millisecond))

		var after trip
		err = r.withConvertEnv(ctx, "IMAGEPIPE_STREAM_OUTPUT", "false", "true", func() (err error) {
			after, err = r.through(ctx, img, fmt.Sprintf("bench/"+name+"/%d/after-conversion.vhdx", rep))
			return err
		})
		if err != nil {
			return nil, err
		}
		p.AfterConversion = append(p.AfterConversion, after.e2e)
		r.logf("%s rep %d: pipeline uploading after conversion %s", name, rep, after.e2e.Round(time.Millisecond))

		// The baseline and the bare stages each read a copy uploaded just
		// before, as the pipeline does: reading the pipeline's input again
		// would find it in the page cache and flatter them.
		seqKey, bareKey := fmt.Sprintf("bench/"+name+"/%d/baseline-input.vhdx", rep), fmt.Sprintf("bench/"+name+"/%d/bare-input.vhdx", rep)
		if err := r.freshCopy(ctx, img, seqKey); err != nil {
			return nil, err
		}
		stages, err := r.sequential(ctx, mc, seqKey, dir, name, rep)
		if err != nil {
			return nil, err
		}
		total := stages[0] + stages[1] + stages[2]
		p.Sequential = append(p.Sequential, total)
		for i := range stages {
			p.SeqStages[i] = append(p.SeqStages[i], stages[i])
		}
		r.logf("%s rep %d: sequential baseline %s (%s + %s + %s)", name, rep, total.Round(time.Millisecond), stages[0].Round(time.Millisecond), stages[1].Round(time.Millisecond), stages[2].Round(time.Millisecond))

		if err := r.freshCopy(ctx, img, bareKey); err != nil {
			return nil, err
		}
		bare, upCPU, err := r.bareStages(ctx, bareKey, dir, name, rep)
		if err != nil {
			return nil, err
		}
		p.BareUploadCPU = append(p.BareUploadCPU, upCPU)
		for i := range bare {
			p.Bare[i] = append(p.Bare[i], bare[i])
		}
		r.logf("%s rep %d: bare stages %s + %s + %s", name, rep, bare[0].Round(time.Millisecond), bare[1].Round(time.Millisecond), bare[2].Round(time.Millisecond))
		if err := r.removeAll(ctx, fmt.Sprintf("bench/%s/%d/", name, rep), fmt.Sprintf("baseline/%s/%d/", name, rep), fmt.Sprintf("bare/%s/%d/", name, rep)); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// withConvertEnv runs f with the convert replica restarted with key=value,
// and restarts it with key=restore afterwards.
func (r *Runner) withConvertEnv(ctx context.Context, key, value, restore string, f func() error) error {
	conv := r.st.Procs["convert"]
	restart := func(v string) error {
		conv.Stop(30 * time.Second)
		conv.SetEnv(key, v)
		if err := conv.Start(); err != nil {
			return err
		}
		return r.waitReplica(ctx)
	}
	if err := restart(value); err != nil {
		return err
	}
	ferr := f()
	return errors.Join(ferr, restart(restore))
}

// freshCopy uploads img to key in the output bucket, where no
// notification makes a job of it.
func (r *Runner) freshCopy(ctx context.Context, img stack.Image, key string) error {
	settleDisk()
	_, err := storeZeros(ctx, r.store, stack.OutputBucket, key, img.Path, false)
	return err
}

// sequential is what one would do by hand, reading key in the output
// bucket: download, convert, upload.
func (r *Runner) sequential(ctx context.Context, mc, key, dir, name string, rep int) ([3]time.Duration, error) {
	var d [3]time.Duration
	in, out := filepath.Join(dir, "seq-input.vhdx"), filepath.Join(dir, "seq-output.raw")
	defer os.Remove(in)
	defer os.Remove(out)
	outKey := fmt.Sprintf("baseline/%s/%d/large.vhdx.raw", name, rep)
	if mc != "" {
		access, secret := r.st.Credentials()
		env := append(os.Environ(), "MC_HOST_bench=http://"+access+":"+secret+"@"+r.st.S3Endpoint())
		run := func(args ...string) (time.Duration, error) {
			start := time.Now()
			cmd := exec.CommandContext(ctx, mc, append([]string{"--quiet"}, args...)...)
			cmd.Env = env
			if out, err := cmd.CombinedOutput(); err != nil {
				return 0, fmt.Errorf("mc %s: %v\n%s", strings.Join(args, " "), err, out)
			}
			return time.Since(start), nil
		}
		var err error
		if d[0], err = run("cp", "bench/"+stack.OutputBucket+"/"+key, in); err != nil {
			return d, err
		}
		if d[1], err = qemuConvert(ctx, in, "vhdx", out); err != nil {
			return d, err
		}
		d[2], err = run("cp", out, "bench/"+stack.OutputBucket+"/"+outKey)
		return d, err
	}
	start := time.Now()
	if err := r.st.S3.FGetObject(ctx, stack.OutputBucket, key, in, minio.GetObjectOptions{}); err != nil {
		return d, err
	}
	d[0] = time.Since(start)
	var err error
	if d[1], err = qemuConvert(ctx, in, "vhdx", out); err != nil {
		return d, err
	}
	start = time.Now()
	if _, err := r.st.S3.FPutObject(ctx, stack.OutputBucket, outKey, out, minio.PutObjectOptions{}); err != nil {
		return d, err
	}
	d[2] = time.Since(start)
	return d, nil
}

// bareStages times each stage alone the way convert does it, reading key
// in the output bucket: a streamed download, the same qemu-img command,
// the same parallel upload.
func (r *Runner) bareStages(ctx context.Context, key, dir, name string, rep int) ([3]time.Duration, cpuTime, error) {
	var d [3]time.Duration
	in, out := filepath.Join(dir, "bare-input.vhdx"), filepath.Join(dir, "bare-output.raw")
	defer os.Remove(in)
	defer os.Remove(out)
	var err error
	if d[0], err = r.bareDownload(ctx, key, in); err != nil {
		return d, cpuTime{}, err
	}
	if d[1], err = bareConvert(ctx, in, "vhdx", out, dir); err != nil {
		return d, cpuTime{}, err
	}
	cpu0 := readCPU(r.st.MinIOPid())
	if d[2], err = r.bareUpload(ctx, out, fmt.Sprintf("bare/%s/%d/large.vhdx.raw", name, rep)); err != nil {
		return d, cpuTime{}, err
	}
	return d, readCPU(r.st.MinIOPid()).sub(cpu0), nil
}

// bareDownload streams key in the output bucket into path as convert
// downloads an input: written with O_DIRECT where the file system allows.
func (r *Runner) bareDownload(ctx context.Context, key, path string) (time.Duration, error) {
	start := time.Now()
	rc, _, err := r.store.Open(ctx, stack.OutputBucket, key, "", "")
	if err != nil {
		return 0, err
	}
	defer rc.Close()
	f, err := scratch.Create(path)
	if err != nil {
		return 0, err
	}
	_, err = f.ReadFrom(rc)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return 0, fmt.Errorf("download %s: %w", key, err)
	}
	return time.Since(start), nil
}

// bareConvert runs convert's qemu-img command on in, with the cache modes
// convert picks for dir.
func bareConvert(ctx context.Context, in, format, out, dir string) (time.Duration, error) {
	return qemuConvert(ctx, in, format, out, qemuimg.CacheArgs(scratch.Supported(dir))...)
}

// bareUpload stores the raw file at path under key in the output bucket
// as convert uploads a raw output: parts that are holes copied from the
// zero object, the rest sent.
func (r *Runner) bareUpload(ctx context.Context, path, key string) (time.Duration, error) {
	start := time.Now()
	if _, err := storeZeros(ctx, r.store, stack.OutputBucket, key, path, true); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

// removeAll deletes, from both buckets, every object under the prefixes:
// a run's objects are not needed once it is measured, and keeping every
// run's would fill the disk the next ones run on.
func (r *Runner) removeAll(ctx context.Context, prefixes ...string) error {
	for _, bucket := range []string{stack.InputBucket, stack.OutputBucket} {
		for _, prefix := range prefixes {
			objs := r.st.S3.ListObjects(ctx, bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true})
			for e := range r.st.S3.RemoveObjects(ctx, bucket, objs, minio.RemoveObjectsOptions{}) {
				if e.Err != nil {
					return fmt.Errorf("remove %s/%s: %w", bucket, e.ObjectName, e.Err)
				}
			}
		}
	}
	return nil
}

// Overhead is the overhead on small images, per job: every repetition of
// every image is one job.
type Overhead struct {
	Images, Jobs int
	E2E          []time.Duration   // upload complete → result event
	Qemu         []time.Duration   // qemu-img convert alone on the job's file: median of Reps
	Notify       []time.Duration   // upload complete → notification on NATS
	Overhead     []time.Duration   // E2E − Qemu
	Own          []time.Duration   // Overhead − Notify: what imagepipe itself adds
	Stages       [][]time.Duration // per stage (see Stages), per job
}

// smallKinds are converted by qemu-img; raw and OVA uploads take other paths.
var smallKinds = []string{stack.KindVHDX, stack.KindVMDK, stack.KindQcow2, stack.KindVHD, stack.KindVDI, stack.KindVMDKStream}

func (r *Runner) smallImages(ctx context.Context, name string, n int) ([]stack.Image, error) {
	keys := make([]string, n)
	specs := make([]stack.Spec, n)
	for i := range n {
		kind := smallKinds[i%len(smallKinds)]
		keys[i] = fmt.Sprintf("%s-%03d-%s", name, i, kind)
		specs[i] = stack.Spec{Kind: kind, Virtual: int64(16+(i*29)%49) << 20, Data: int64(1+i%4) << 20, Seed: uint64(i + 1)}
	}
	return stack.MakeAll(ctx, filepath.Join(r.cfg.Dir, name), keys, specs, false)
}

// RunOverhead sends small images one at a time, each Reps times, and
// times qemu-img alone on each after each trip.
func (r *Runner) RunOverhead(ctx context.Context) (*Overhead, error) {
	imgs, err := r.smallImages(ctx, "overhead", r.cfg.OverheadImages)
	if err != nil {
		return nil, err
	}
	p := &Overhead{Images: len(imgs)}
	tmp := filepath.Join(r.cfg.Dir, "overhead", "out.raw")
	var keys []string
	var trips []trip
	for i, img := range imgs {
		var e2e, qemu, notify []time.Duration
		for rep := range r.cfg.Reps {
			key := fmt.Sprintf("bench/overhead/%d/%s", rep, img.Key)
			t, err := r.through(ctx, img, key)
			if err != nil {
				return nil, err
			}
			keys, trips = append(keys, key), append(trips, t)
			e2e, notify = append(e2e, t.e2e), append(notify, t.notify)
			q, err := qemuConvert(ctx, img.Path, img.Format, tmp, qemuimg.CacheArgs(false)...)
			if err != nil {
				return nil, err
			}
			qemu = append(qemu, q)
			_ = os.Remove(tmp)
		}
		// qemu-img's own time on a file varies little; its median is
		// what each of the image's jobs is measured against.
		mq := stack.Median(qemu)
		for j := range e2e {
			p.E2E, p.Qemu, p.Notify = append(p.E2E, e2e[j]), append(p.Qemu, mq), append(p.Notify, notify[j])
			p.Overhead = append(p.Overhead, e2e[j]-mq)
			p.Own = append(p.Own, e2e[j]-mq-notify[j])
		}
		r.logf("overhead image %d (%s): end to end %s, qemu-img %s", i, img.Spec.Kind, list(e2e, msRound), mq.Round(time.Millisecond))
	}
	p.Jobs = len(p.E2E)
	marks, err := r.logMarksOf(keys)
	if err != nil {
		return nil, err
	}
	p.Stages = make([][]time.Duration, len(Stages))
	for j, key := range keys {
		for i, d := range r.stagesFrom(key, trips[j], marks[key]) {
			p.Stages[i] = append(p.Stages[i], d)
		}
	}
	if err := r.removeAll(ctx, "bench/overhead/"); err != nil {
		return nil, err
	}
	return p, nil
}

func msRound(d time.Duration) string { return d.Round(time.Millisecond).String() }

// ctl runs `imagepipe ctl VERB --function convert`.
func (r *Runner) ctl(ctx context.Context, verb string) error {
	cmd := exec.CommandContext(ctx, r.cfg.Binary, "ctl", verb, "--function", "convert", "--timeout", "300ms")
	cmd.Env = append(os.Environ(), "IMAGEPIPE_NATS_URL="+r.st.NATSURL())
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("imagepipe ctl %s: %v\n%s", verb, err, out)
	}
	return nil
}

// waitReplica waits until a convert replica answers `ctl status`.
func (r *Runner) waitReplica(ctx context.Context) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		cmd := exec.CommandContext(ctx, r.cfg.Binary, "ctl", "status", "--function", "convert", "--timeout", "300ms")
		cmd.Env = append(os.Environ(), "IMAGEPIPE_NATS_URL="+r.st.NATSURL())
		out, err := cmd.CombinedOutput()
		if err == nil && strings.Contains(string(out), "running") {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no convert replica running after 30s: %v\n%s", err, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// waitQueued waits until n jobs wait for the convert consumer.
func (r *Runner) waitQueued(ctx context.Context, n int) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := r.st.JS.Consumer(ctx, events.StreamJobs, events.ConsumerConvert)
		if err != nil {
			return err
		}
		info, err := c.Info(ctx)
		if err != nil {
			return err
		}
		if info.NumPending+uint64(info.NumAckPending) >= uint64(n) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d jobs queued after 60s", info.NumPending+uint64(info.NumAckPending), n)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Memory is a convert replica's peak memory by image size.
type Memory struct {
	Data  int64
	Sizes []int64
	Peak  []int64 // VmHWM of a fresh replica after converting one image
}

// RunMemory converts one sparse image of each size, each on a freshly started
// replica, and reads its peak RSS.
func (r *Runner) RunMemory(ctx context.Context) (*Memory, error) {
	p := &Memory{Data: r.cfg.MemoryData, Sizes: r.cfg.MemorySizes}
	dir := filepath.Join(r.cfg.Dir, "memory")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	conv := r.st.Procs["convert"]
	for i, size := range p.Sizes {
		img, err := stack.Make(ctx, dir, fmt.Sprintf("sparse-%d", i), stack.Spec{Kind: stack.KindQcow2, Virtual: size, Data: p.Data, Seed: uint64(i + 100)}, false)
		if err != nil {
			return nil, err
		}
		conv.Stop(30 * time.Second)
		if err := conv.Start(); err != nil {
			return nil, err
		}
		if err := r.waitReplica(ctx); err != nil {
			return nil, err
		}
		if _, err := r.through(ctx, img, "bench/memory/"+filepath.Base(img.Path)); err != nil {
			return nil, err
		}
		peak, err := conv.PeakRSS()
		if err != nil {
			return nil, err
		}
		p.Peak = append(p.Peak, peak)
		r.logf("memory %s virtual: convert peak RSS %d MiB", mib(size), peak>>20)
		_ = os.Remove(img.Path)
	}
	if err := r.removeAll(ctx, "bench/memory/"); err != nil {
		return nil, err
	}
	return p, nil
}
