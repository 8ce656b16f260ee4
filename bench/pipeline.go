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
	"syscall"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/nats-io/nats.go"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/direct"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
	"github.com/imagepipe/imagepipe/test/stack"
)

// Config sizes a run; every field has an environment knob in
// cmd/benchreport so that the run can be scaled down.
type Config struct {
	Dir    string // work space: images, MinIO data, scratch, all on one disk
	Binary string // the imagepipe command
	Reps   int    // repetitions of P1 and of each P2 image; medians are reported

	P1Virtual, P1Data int64
	P2Images          int
	P3Images          int
	P3Concurrency     int
	P4Sizes           []int64
	P4Data            int64

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
	return r, nil
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
	return out, nil
}

// logMarks reads convert's JSON log for the first line of each stage of
// the job on key.
func (r *Runner) logMarks(key string) (map[string]time.Time, error) {
	f, err := os.Open(r.st.Procs["convert"].LogPath())
	if err != nil {
		return nil, err
	}
	defer f.Close()
	marks := map[string]time.Time{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var line struct {
			Time  time.Time `json:"time"`
			Key   string    `json:"key"`
			Stage string    `json:"stage"`
		}
		if json.Unmarshal(sc.Bytes(), &line) != nil || line.Key != key || line.Stage == "" {
			continue
		}
		if _, seen := marks[line.Stage]; !seen {
			marks[line.Stage] = line.Time
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
	err := r.results.Wait(ctx, func(rs []stack.Result) bool {
		for _, x := range rs {
			if x.Key == key && x.Final() {
				found = x
				return true
			}
		}
		return false
	})
	if err != nil {
		return found, fmt.Errorf("no result for %s: %w", key, err)
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

// P1 is the large-image comparison.
type P1 struct {
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

// RunP1 converts the large image through the pipeline, the sequential
// baseline and the bare stages, Reps times each, interleaved so that a
// change in the machine's load touches all three alike.
func (r *Runner) RunP1(ctx context.Context) (*P1, error) {
	p := &P1{Virtual: r.cfg.P1Virtual, Data: r.cfg.P1Data}
	dir := filepath.Join(r.cfg.Dir, "p1")
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
		key := fmt.Sprintf("bench/p1/%d/large.vhdx", rep)
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
		r.logf("P1 rep %d: pipeline %s (notification %s)", rep, t.e2e.Round(time.Millisecond), t.notify.Round(time.Millisecond))

		var after trip
		err = r.withConvertEnv(ctx, "IMAGEPIPE_STREAM_OUTPUT", "false", "true", func() (err error) {
			after, err = r.through(ctx, img, fmt.Sprintf("bench/p1/%d/after-conversion.vhdx", rep))
			return err
		})
		if err != nil {
			return nil, err
		}
		p.AfterConversion = append(p.AfterConversion, after.e2e)
		r.logf("P1 rep %d: pipeline uploading after conversion %s", rep, after.e2e.Round(time.Millisecond))

		// The baseline and the bare stages each read a copy uploaded just
		// before, as the pipeline does: reading the pipeline's input again
		// would find it in the page cache and flatter them.
		seqKey, bareKey := fmt.Sprintf("bench/p1/%d/baseline-input.vhdx", rep), fmt.Sprintf("bench/p1/%d/bare-input.vhdx", rep)
		if err := r.freshCopy(ctx, img, seqKey); err != nil {
			return nil, err
		}
		stages, err := r.sequential(ctx, mc, seqKey, dir, rep)
		if err != nil {
			return nil, err
		}
		total := stages[0] + stages[1] + stages[2]
		p.Sequential = append(p.Sequential, total)
		for i := range stages {
			p.SeqStages[i] = append(p.SeqStages[i], stages[i])
		}
		r.logf("P1 rep %d: sequential baseline %s (%s + %s + %s)", rep, total.Round(time.Millisecond), stages[0].Round(time.Millisecond), stages[1].Round(time.Millisecond), stages[2].Round(time.Millisecond))

		if err := r.freshCopy(ctx, img, bareKey); err != nil {
			return nil, err
		}
		bare, upCPU, err := r.bareStages(ctx, bareKey, dir, rep)
		if err != nil {
			return nil, err
		}
		p.BareUploadCPU = append(p.BareUploadCPU, upCPU)
		for i := range bare {
			p.Bare[i] = append(p.Bare[i], bare[i])
		}
		r.logf("P1 rep %d: bare stages %s + %s + %s", rep, bare[0].Round(time.Millisecond), bare[1].Round(time.Millisecond), bare[2].Round(time.Millisecond))
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
	_, err := r.store.UploadFile(ctx, stack.OutputBucket, key, img.Path, nil, nil)
	return err
}

// settleDisk writes back what earlier runs left dirty, so that each timed
// run starts with the disk idle rather than paying for its predecessor's
// writeback.
func settleDisk() { syscall.Sync() }

// sequential is what one would do by hand, reading key in the output
// bucket: download, convert, upload.
func (r *Runner) sequential(ctx context.Context, mc, key, dir string, rep int) ([3]time.Duration, error) {
	var d [3]time.Duration
	in, out := filepath.Join(dir, "seq-input.vhdx"), filepath.Join(dir, "seq-output.raw")
	defer os.Remove(in)
	defer os.Remove(out)
	outKey := fmt.Sprintf("baseline/p1/%d/large.vhdx.raw", rep)
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
func (r *Runner) bareStages(ctx context.Context, key, dir string, rep int) ([3]time.Duration, cpuTime, error) {
	var d [3]time.Duration
	in, out := filepath.Join(dir, "bare-input.vhdx"), filepath.Join(dir, "bare-output.raw")
	defer os.Remove(in)
	defer os.Remove(out)
	start := time.Now()
	rc, _, err := r.store.Open(ctx, stack.OutputBucket, key, "", "")
	if err != nil {
		return d, cpuTime{}, err
	}
	f, err := direct.Create(in)
	if err == nil {
		_, err = f.ReadFrom(rc)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	rc.Close()
	if err != nil {
		return d, cpuTime{}, err
	}
	d[0] = time.Since(start)
	if d[1], err = qemuConvert(ctx, in, "vhdx", out, qemuimg.CacheArgs(direct.Supported(dir))...); err != nil {
		return d, cpuTime{}, err
	}
	start = time.Now()
	cpu0 := readCPU(r.st.MinIOPid())
	if _, err := r.store.UploadFile(ctx, stack.OutputBucket, fmt.Sprintf("bare/p1/%d/large.vhdx.raw", rep), out, nil, nil); err != nil {
		return d, cpuTime{}, err
	}
	d[2] = time.Since(start)
	cpu := readCPU(r.st.MinIOPid()).sub(cpu0)
	return d, cpu, nil
}

// P2 is the overhead on small images.
type P2 struct {
	Images   int
	E2E      []time.Duration // per image: median of Reps
	Qemu     []time.Duration // qemu-img convert alone on the same file: median of Reps
	Notify   []time.Duration // upload complete → notification on NATS
	Overhead []time.Duration // E2E − Qemu
	Own      []time.Duration // Overhead − Notify: what imagepipe itself adds
}

// p2Kinds are converted by qemu-img; raw and OVA uploads take other paths.
var p2Kinds = []string{stack.KindVHDX, stack.KindVMDK, stack.KindQcow2, stack.KindVHD, stack.KindVDI, stack.KindVMDKStream}

func (r *Runner) smallImages(ctx context.Context, name string, n int) ([]stack.Image, error) {
	keys := make([]string, n)
	specs := make([]stack.Spec, n)
	for i := range n {
		kind := p2Kinds[i%len(p2Kinds)]
		keys[i] = fmt.Sprintf("%s-%03d-%s", name, i, kind)
		specs[i] = stack.Spec{Kind: kind, Virtual: int64(16+(i*29)%49) << 20, Data: int64(1+i%4) << 20, Seed: uint64(i + 1)}
	}
	return stack.MakeAll(ctx, filepath.Join(r.cfg.Dir, name), keys, specs, false)
}

// RunP2 sends small images one at a time, each Reps times.
func (r *Runner) RunP2(ctx context.Context) (*P2, error) {
	imgs, err := r.smallImages(ctx, "p2", r.cfg.P2Images)
	if err != nil {
		return nil, err
	}
	p := &P2{Images: len(imgs)}
	tmp := filepath.Join(r.cfg.Dir, "p2", "out.raw")
	for i, img := range imgs {
		var e2e, qemu, notify []time.Duration
		for rep := range r.cfg.Reps {
			t, err := r.through(ctx, img, fmt.Sprintf("bench/p2/%d/%s", rep, img.Key))
			if err != nil {
				return nil, err
			}
			e2e, notify = append(e2e, t.e2e), append(notify, t.notify)
			q, err := qemuConvert(ctx, img.Path, img.Format, tmp, qemuimg.CacheArgs(false)...)
			if err != nil {
				return nil, err
			}
			qemu = append(qemu, q)
			_ = os.Remove(tmp)
		}
		me, mq, mn := stack.Median(e2e), stack.Median(qemu), stack.Median(notify)
		p.E2E, p.Qemu, p.Notify = append(p.E2E, me), append(p.Qemu, mq), append(p.Notify, mn)
		p.Overhead = append(p.Overhead, me-mq)
		p.Own = append(p.Own, me-mq-mn)
		r.logf("P2 image %d (%s): end to end %s, qemu-img %s, notification %s", i, img.Spec.Kind, me.Round(time.Millisecond), mq.Round(time.Millisecond), mn.Round(time.Millisecond))
	}
	return p, nil
}

// P3 is burst throughput against qemu-img alone.
type P3 struct {
	Images, Concurrency int
	Pipeline            []time.Duration // resume → last result
	Qemu                []time.Duration // the same conversions, same concurrency, local files
}

// RunP3 queues a burst with convert paused, resumes it, and times the
// burst's conversions; then runs qemu-img alone on the same files at the
// same concurrency.
func (r *Runner) RunP3(ctx context.Context) (*P3, error) {
	imgs, err := r.smallImages(ctx, "p3", r.cfg.P3Images)
	if err != nil {
		return nil, err
	}
	p := &P3{Images: len(imgs), Concurrency: r.cfg.P3Concurrency}
	conv := r.st.Procs["convert"]
	conv.Stop(30 * time.Second)
	conv.SetEnv("IMAGEPIPE_MAX_CONCURRENT_JOBS", strconv.Itoa(p.Concurrency))
	if err := conv.Start(); err != nil {
		return nil, err
	}
	defer func() {
		conv.Stop(30 * time.Second)
		conv.SetEnv("IMAGEPIPE_MAX_CONCURRENT_JOBS", strconv.Itoa(convertConcurrency))
		_ = conv.Start()
	}()
	if err := r.waitReplica(ctx); err != nil {
		return nil, err
	}
	for rep := range r.cfg.Reps {
		if err := r.ctl(ctx, "pause"); err != nil {
			return nil, err
		}
		prefix := fmt.Sprintf("bench/p3/%d/", rep)
		for _, img := range imgs {
			img.Key = prefix + img.Key
			if _, err := r.st.Upload(ctx, img); err != nil {
				return nil, err
			}
		}
		if err := r.waitQueued(ctx, len(imgs)); err != nil {
			return nil, err
		}
		start := time.Now()
		if err := r.ctl(ctx, "resume"); err != nil {
			return nil, err
		}
		var last time.Time
		for _, img := range imgs {
			res, err := r.await(ctx, prefix+img.Key)
			if err != nil {
				return nil, err
			}
			if res.At.After(last) {
				last = res.At
			}
		}
		p.Pipeline = append(p.Pipeline, last.Sub(start))

		q, err := qemuBurst(ctx, imgs, p.Concurrency, filepath.Join(r.cfg.Dir, "p3"))
		if err != nil {
			return nil, err
		}
		p.Qemu = append(p.Qemu, q)
		r.logf("P3 rep %d: pipeline %s, qemu-img alone %s", rep, last.Sub(start).Round(time.Millisecond), q.Round(time.Millisecond))
	}
	return p, nil
}

func qemuBurst(ctx context.Context, imgs []stack.Image, concurrency int, dir string) (time.Duration, error) {
	work := make(chan int)
	errs := make(chan error, len(imgs))
	var wg sync.WaitGroup
	start := time.Now()
	for range concurrency {
		wg.Go(func() {
			for i := range work {
				out := filepath.Join(dir, fmt.Sprintf("burst-%d.raw", i))
				if _, err := qemuConvert(ctx, imgs[i].Path, imgs[i].Format, out, qemuimg.CacheArgs(false)...); err != nil {
					errs <- err
				}
				_ = os.Remove(out)
			}
		})
	}
	for i := range imgs {
		work <- i
	}
	close(work)
	wg.Wait()
	took := time.Since(start)
	close(errs)
	return took, <-errs
}

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
		c, err := r.st.JS.Consumer(ctx, events.StreamJobs, "convert")
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

// P4 is a convert replica's peak memory by image size.
type P4 struct {
	Data  int64
	Sizes []int64
	Peak  []int64 // VmHWM of a fresh replica after converting one image
}

// RunP4 converts one sparse image of each size, each on a freshly started
// replica, and reads its peak RSS.
func (r *Runner) RunP4(ctx context.Context) (*P4, error) {
	p := &P4{Data: r.cfg.P4Data, Sizes: r.cfg.P4Sizes}
	dir := filepath.Join(r.cfg.Dir, "p4")
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
		if _, err := r.through(ctx, img, "bench/p4/"+filepath.Base(img.Path)); err != nil {
			return nil, err
		}
		peak, err := conv.PeakRSS()
		if err != nil {
			return nil, err
		}
		p.Peak = append(p.Peak, peak)
		r.logf("P4 %d GiB virtual: convert peak RSS %d MiB", size>>30, peak>>20)
		_ = os.Remove(img.Path)
	}
	return p, nil
}
