package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/imagepipe/imagepipe/test/stack"
)

// Burst is a burst of images through one convert replica against the bare
// stages, the project's own download, qemu-img convert and upload run on
// the same images without the pipeline at the same concurrency.
type Burst struct {
	Images, Concurrency int
	// The range the images' virtual sizes and data span, and their total
	// data.
	MinVirtual, MaxVirtual, MinData, MaxData, TotalData int64
	Pipeline                                            []time.Duration // resume → last result, per run
	Bare                                                []time.Duration // first download → last upload, per run
	// PipelineStages is the time the jobs spent in each of BurstStages,
	// summed over the images, per run; BareStages the same for the bare
	// stages' download, qemu-img convert and upload.
	PipelineStages [][]time.Duration
	BareStages     [3][]time.Duration
	// CPU used while the pipeline worked and while the bare stages ran.
	PipelineCPU, BareCPU []burstCPU
}

// BurstStages are the pipeline's stages a job of a burst goes through once
// it leaves the queue, as the report names them.
var BurstStages = Stages[2:]

// BareBurstStages are the bare stages' steps.
var BareBurstStages = []string{"download", "qemu-img convert", "upload"}

// Throughput is the pipeline's throughput ÷ the bare stages', per run.
func (b *Burst) Throughput() []float64 {
	out := make([]float64, len(b.Pipeline))
	for i := range out {
		out[i] = ratio(b.Bare[i], b.Pipeline[i])
	}
	return out
}

// burstCPU is CPU used during a burst, by who used it.
type burstCPU struct {
	machine   time.Duration // every process on the machine
	minio     time.Duration
	convert   time.Duration // the convert replica itself
	qemu      time.Duration // qemu-img: the runs convert or the bare stages finished
	functions time.Duration // ingest and notify
	// This process: the embedded NATS server and the observers; in the
	// bare stages also the download and the upload.
	bench time.Duration
}

func (a burstCPU) sub(b burstCPU) burstCPU {
	return burstCPU{
		machine: a.machine - b.machine, minio: a.minio - b.minio, convert: a.convert - b.convert,
		qemu: a.qemu - b.qemu, functions: a.functions - b.functions, bench: a.bench - b.bench,
	}
}

// rest is the machine's CPU no process above accounts for: other
// processes, anything else running on a shared machine among them.
func (a burstCPU) rest() time.Duration {
	return max(a.machine-a.minio-a.convert-a.qemu-a.functions-a.bench, 0)
}

// accounted is the CPU of the processes above: the work itself.
func (a burstCPU) accounted() time.Duration { return a.machine - a.rest() }

func (r *Runner) readBurstCPU() burstCPU {
	c := burstCPU{machine: machineCPU()}
	c.minio, _ = procCPU(r.st.MinIOPid())
	convOwn, convChildren := procCPU(r.st.Procs["convert"].Pid())
	benchOwn, benchChildren := procCPU(os.Getpid())
	c.convert, c.bench = convOwn, benchOwn
	// A process's children count once it has waited for them: convert's
	// are its qemu-img runs, this process's the bare stages' (the stack's
	// servers and functions still run, so they are not among them).
	c.qemu = convChildren + benchChildren
	for name, p := range r.st.Procs {
		if name != "convert" {
			own, children := procCPU(p.Pid())
			c.functions += own + children
		}
	}
	return c
}

// burstSpecs varies the burst's images deterministically over what a
// burst of uploads holds: virtual sizes from 256 MiB to 1 GiB, 32 to 128
// MiB of data, in every format qemu-img converts.
func burstSpecs(n int) []stack.Spec {
	specs := make([]stack.Spec, n)
	for i := range n {
		specs[i] = stack.Spec{
			Kind:    smallKinds[i%len(smallKinds)],
			Virtual: int64(256+(i*389)%769) << 20,
			Data:    int64(32+(i*37)%97) << 20,
			Seed:    uint64(1000 + i),
		}
	}
	return specs
}

// RunBurst queues a burst with convert paused, resumes it and times it to
// the last result; then uploads fresh copies of the same images and runs
// the bare stages on them at the same concurrency. Reps times, each run
// of the pipeline next to a run of the bare stages.
func (r *Runner) RunBurst(ctx context.Context) (*Burst, error) {
	dir := filepath.Join(r.cfg.Dir, "burst")
	specs := burstSpecs(r.cfg.BurstImages)
	keys := make([]string, len(specs))
	for i, sp := range specs {
		keys[i] = fmt.Sprintf("burst-%03d-%s", i, sp.Kind)
	}
	r.logf("burst: making %d images", len(specs))
	imgs, err := stack.MakeAll(ctx, dir, keys, specs, false)
	if err != nil {
		return nil, err
	}
	p := &Burst{Images: len(imgs), Concurrency: r.cfg.BurstConcurrency, MinVirtual: specs[0].Virtual, MinData: specs[0].Data}
	for _, sp := range specs {
		p.MinVirtual, p.MaxVirtual = min(p.MinVirtual, sp.Virtual), max(p.MaxVirtual, sp.Virtual)
		p.MinData, p.MaxData = min(p.MinData, sp.Data), max(p.MaxData, sp.Data)
		p.TotalData += sp.Data
	}
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
	p.PipelineStages = make([][]time.Duration, len(BurstStages))
	for rep := range r.cfg.Reps {
		prefix := fmt.Sprintf("bench/burst/%d/", rep)
		wall, err := r.burstRun(ctx, prefix, burstSeries{&p.Pipeline, &p.PipelineCPU, p.PipelineStages}, func() (time.Duration, []time.Duration, burstCPU, error) {
			return r.pipelineBurst(ctx, imgs, prefix+"pipeline/")
		})
		if err != nil {
			return nil, err
		}
		bare, err := r.burstRun(ctx, prefix, burstSeries{&p.Bare, &p.BareCPU, p.BareStages[:]}, func() (time.Duration, []time.Duration, burstCPU, error) {
			return r.bareBurst(ctx, imgs, prefix+"bare/", p.Concurrency, dir)
		})
		if err != nil {
			return nil, err
		}
		r.logf("burst rep %d: pipeline %s, bare stages %s: %.2f× their throughput", rep, wall.Round(time.Millisecond), bare.Round(time.Millisecond), ratio(bare, wall))
	}
	return p, nil
}

// burstSeries points at the fields of Burst that hold one way of running
// the burst, the pipeline or the bare stages: a wall time, a CPU reading
// and a time per stage for each rep.
type burstSeries struct {
	wall   *[]time.Duration
	cpu    *[]burstCPU
	stages [][]time.Duration
}

// burstRun runs one way of a rep, adds its times to s, and removes the
// rep's objects under prefix: the pipeline's go before the bare stages'
// arrive, so the disk holds one run's at a time. It returns the wall time.
func (r *Runner) burstRun(ctx context.Context, prefix string, s burstSeries, run func() (time.Duration, []time.Duration, burstCPU, error)) (time.Duration, error) {
	wall, stages, cpu, err := run()
	if err != nil {
		return 0, err
	}
	*s.wall, *s.cpu = append(*s.wall, wall), append(*s.cpu, cpu)
	for i := range stages {
		s.stages[i] = append(s.stages[i], stages[i])
	}
	return wall, r.removeAll(ctx, prefix)
}

// pipelineBurst uploads imgs under prefix with convert paused, resumes it
// and waits for the last result. It returns the time from resume to that
// result, the time the jobs spent in each of BurstStages summed over them,
// and the CPU used meanwhile.
func (r *Runner) pipelineBurst(ctx context.Context, imgs []stack.Image, prefix string) (time.Duration, []time.Duration, burstCPU, error) {
	if err := r.ctl(ctx, "pause"); err != nil {
		return 0, nil, burstCPU{}, err
	}
	keys := make([]string, len(imgs))
	for i, img := range imgs {
		img.Key = prefix + img.Key
		keys[i] = img.Key
		if _, err := r.st.Upload(ctx, img); err != nil {
			return 0, nil, burstCPU{}, err
		}
	}
	if err := r.waitQueued(ctx, len(imgs)); err != nil {
		return 0, nil, burstCPU{}, err
	}
	settleDisk()
	cpu0, start := r.readBurstCPU(), time.Now()
	if err := r.ctl(ctx, "resume"); err != nil {
		return 0, nil, burstCPU{}, err
	}
	var last time.Time
	results := make([]stack.Result, len(keys))
	for i, key := range keys {
		res, err := r.await(ctx, key)
		if err != nil {
			return 0, nil, burstCPU{}, err
		}
		results[i] = res
		if res.At.After(last) {
			last = res.At
		}
	}
	cpu := r.readBurstCPU().sub(cpu0)
	marks, err := r.logMarksOf(keys)
	if err != nil {
		return 0, nil, burstCPU{}, err
	}
	// Each stage lasts from the line convert logs as the job enters it to
	// the next one's; the last, from "ready" to the result event.
	stages := make([]time.Duration, len(BurstStages))
	for i, key := range keys {
		at := make([]time.Time, 0, len(convertStages)+1)
		for _, st := range convertStages {
			at = append(at, marks[key][st])
		}
		at = append(at, results[i].At)
		for s := range stages {
			if !at[s].IsZero() && !at[s+1].IsZero() {
				stages[s] += at[s+1].Sub(at[s])
			}
		}
	}
	return last.Sub(start), stages, cpu, nil
}

// bareBurst stores fresh copies of imgs under prefix in the output bucket,
// then runs the bare stages on each, concurrency images at a time: the
// download, qemu-img convert and upload convert does, without the
// pipeline. It returns the time from the first download to the last
// upload, each stage's time summed over the images, and the CPU used
// meanwhile.
func (r *Runner) bareBurst(ctx context.Context, imgs []stack.Image, prefix string, concurrency int, dir string) (time.Duration, []time.Duration, burstCPU, error) {
	var stages [3]time.Duration
	for _, img := range imgs {
		// A copy of its own, as the pipeline's input is: reading one
		// already read would find it in the page cache.
		if err := r.freshCopy(ctx, img, prefix+img.Key); err != nil {
			return 0, nil, burstCPU{}, err
		}
	}
	settleDisk()
	var (
		mu   sync.Mutex
		errs []error
		wg   sync.WaitGroup
	)
	work := make(chan int)
	cpu0, start := r.readBurstCPU(), time.Now()
	for w := range concurrency {
		wg.Go(func() {
			for i := range work {
				d, err := r.bareOne(ctx, imgs[i], prefix, filepath.Join(dir, fmt.Sprintf("bare-%d", w)))
				mu.Lock()
				for s := range d {
					stages[s] += d[s]
				}
				if err != nil {
					errs = append(errs, err)
				}
				mu.Unlock()
			}
		})
	}
	for i := range imgs {
		work <- i
	}
	close(work)
	wg.Wait()
	took, cpu := time.Since(start), r.readBurstCPU().sub(cpu0)
	return took, stages[:], cpu, errors.Join(errs...)
}

// bareOne downloads, converts and uploads one image of a bare burst.
func (r *Runner) bareOne(ctx context.Context, img stack.Image, prefix, base string) ([3]time.Duration, error) {
	var d [3]time.Duration
	in, out := base+"-input", base+"-output.raw"
	defer os.Remove(in)
	defer os.Remove(out)
	var err error
	if d[0], err = r.bareDownload(ctx, prefix+img.Key, in); err != nil {
		return d, err
	}
	if d[1], err = bareConvert(ctx, in, img.Format, out, filepath.Dir(base)); err != nil {
		return d, err
	}
	d[2], err = r.bareUpload(ctx, out, prefix+img.Key+".raw")
	return d, err
}
