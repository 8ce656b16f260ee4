//go:build load

package load

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/imagepipe/imagepipe/test/stack"
)

// Settings, from the environment:
//
//	LOAD_IMAGES       images in the burst (required)
//	LOAD_CONCURRENCY  IMAGEPIPE_MAX_CONCURRENT_JOBS values to run (default 1,2,4)
//	LOAD_MIN_MIB, LOAD_MAX_MIB  virtual size range (default 16, 64)
//	LOAD_TIMEOUT      per run (default 30m)
type settings struct {
	images        int
	concurrency   []int
	minMiB        int
	maxMiB        int
	timeout       time.Duration
	uploadStreams int
}

func settingsFromEnv(t *testing.T) settings {
	t.Helper()
	v := os.Getenv("LOAD_IMAGES")
	if v == "" {
		t.Fatal("set LOAD_IMAGES (or run go tool task load) to run the load test")
	}
	s := settings{concurrency: []int{1, 2, 4}, minMiB: 16, maxMiB: 64, timeout: 30 * time.Minute, uploadStreams: 8}
	var err error
	if s.images, err = strconv.Atoi(v); err != nil || s.images < 1 {
		t.Fatalf("LOAD_IMAGES=%q", v)
	}
	if v := os.Getenv("LOAD_CONCURRENCY"); v != "" {
		s.concurrency = nil
		for _, f := range strings.Split(v, ",") {
			n, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || n < 1 {
				t.Fatalf("LOAD_CONCURRENCY=%q", v)
			}
			s.concurrency = append(s.concurrency, n)
		}
	}
	for name, p := range map[string]*int{"LOAD_MIN_MIB": &s.minMiB, "LOAD_MAX_MIB": &s.maxMiB} {
		if v := os.Getenv(name); v != "" {
			if *p, err = strconv.Atoi(v); err != nil {
				t.Fatalf("%s=%q", name, v)
			}
		}
	}
	if v := os.Getenv("LOAD_TIMEOUT"); v != "" {
		if s.timeout, err = time.ParseDuration(v); err != nil {
			t.Fatalf("LOAD_TIMEOUT=%q", v)
		}
	}
	return s
}

// run is one burst at one concurrency.
type run struct {
	concurrency int
	images      int
	took        time.Duration // first upload started → last result
	latencies   []time.Duration
	failures    []string
}

func TestBurstOfSmallImages(t *testing.T) {
	s := settingsFromEnv(t)
	if err := stack.CheckTools(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	dir := t.TempDir()
	bin, err := stack.Build(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}

	rng := rand.New(rand.NewPCG(1, 2))
	keys := make([]string, s.images)
	specs := make([]stack.Spec, s.images)
	for i := range specs {
		kind := stack.MixedKinds[i%len(stack.MixedKinds)]
		virtual := int64(s.minMiB+rng.IntN(s.maxMiB-s.minMiB+1)) << 20
		specs[i] = stack.Spec{Kind: kind, Virtual: virtual, Data: int64(1+rng.IntN(4)) << 20, Seed: rng.Uint64()}
		keys[i] = fmt.Sprintf("%04d-%s", i, kind)
	}
	start := time.Now()
	imgs, err := stack.MakeAll(ctx, filepath.Join(dir, "images"), keys, specs, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("built %d images in %s", len(imgs), time.Since(start).Round(time.Second))

	// The same files go up once per run under new keys: de-duplication
	// would turn every run after the first into server-side copies.
	st, err := stack.Start(ctx, stack.Config{
		Dir: filepath.Join(dir, "stack"), Binary: bin, Compress: true, QueueEvents: true,
		Env: map[string]string{"IMAGEPIPE_DEDUP": "off", "IMAGEPIPE_LOG_LEVEL": "info"},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if err := st.WaitConsumers(ctx); err != nil {
		t.Fatal(err)
	}
	results, err := st.CollectResults(ctx, "load")
	if err != nil {
		t.Fatal(err)
	}
	defer results.Stop()

	var runs []run
	for _, c := range s.concurrency {
		conv := st.Procs["convert"]
		conv.Stop(30 * time.Second)
		conv.SetEnv("IMAGEPIPE_MAX_CONCURRENT_JOBS", strconv.Itoa(c))
		if err := conv.Start(); err != nil {
			t.Fatal(err)
		}
		r := burst(ctx, t, st, results, imgs, fmt.Sprintf("load/c%d/", c), s)
		r.concurrency = c
		runs = append(runs, r)
		for _, f := range r.failures {
			t.Errorf("concurrency %d: %s", c, f)
		}
	}
	report(t, runs)
}

// burst uploads every image at once under prefix and waits for all their
// results.
func burst(ctx context.Context, t *testing.T, st *stack.Stack, results *stack.Results, imgs []stack.Image, prefix string, s settings) run {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, s.timeout)
	defer cancel()
	r := run{images: len(imgs)}
	var mu sync.Mutex
	uploaded := map[string]time.Time{}
	work := make(chan stack.Image)
	var wg sync.WaitGroup
	start := time.Now()
	for range s.uploadStreams {
		wg.Go(func() {
			for img := range work {
				img.Key = prefix + img.Key
				at, err := st.Upload(ctx, img)
				mu.Lock()
				if err != nil {
					r.failures = append(r.failures, err.Error())
				} else {
					uploaded[img.Key] = at
				}
				mu.Unlock()
			}
		})
	}
	for _, img := range imgs {
		work <- img
	}
	close(work)
	wg.Wait()

	mine := func(rs []stack.Result) map[string]stack.Result {
		out := map[string]stack.Result{}
		for _, x := range rs {
			if x.Final() && strings.HasPrefix(x.Key, prefix) {
				if _, dup := out[x.Key]; !dup {
					out[x.Key] = x
				}
			}
		}
		return out
	}
	err := results.Wait(ctx, func(rs []stack.Result) bool { return len(mine(rs)) >= len(uploaded) })
	got := mine(results.All())
	if err != nil {
		r.failures = append(r.failures, fmt.Sprintf("%d of %d results within %s", len(got), len(uploaded), s.timeout))
	}
	var last time.Time
	for key, res := range got {
		if res.Failed != nil {
			r.failures = append(r.failures, fmt.Sprintf("%s failed in %s: %s", key, res.Failed.Phase, res.Failed.Message))
			continue
		}
		r.latencies = append(r.latencies, res.At.Sub(uploaded[key]))
		if res.At.After(last) {
			last = res.At
		}
	}
	r.took = last.Sub(start)
	return r
}

func report(t *testing.T, runs []run) {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "\nburst of %d images, one convert replica, %d CPU cores\n\n", runs[0].images, runtime.NumCPU())
	w := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "jobs/replica\timages\ttook\timages/min\tvs 1 job\tp50\tp95\tp99\tlost or failed\t")
	base := 0.0
	for _, r := range runs {
		perMin := float64(len(r.latencies)) / r.took.Minutes()
		if base == 0 {
			base = perMin
		}
		fmt.Fprintf(w, "%d\t%d\t%s\t%.1f\t%.2f×\t%s\t%s\t%s\t%d\t\n", r.concurrency, r.images, r.took.Round(100*time.Millisecond),
			perMin, perMin/base, stack.Percentile(r.latencies, 50).Round(10*time.Millisecond),
			stack.Percentile(r.latencies, 95).Round(10*time.Millisecond), stack.Percentile(r.latencies, 99).Round(10*time.Millisecond),
			r.images-len(r.latencies))
	}
	w.Flush()
	t.Log(b.String())
}
