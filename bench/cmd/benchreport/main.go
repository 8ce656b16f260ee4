// Command benchreport runs imagepipe's benchmarks against their baselines
// on the real stack and writes bench/REPORT.md. `go tool task bench` runs
// it. Sizes come from the environment so that a run can be scaled down:
//
//	BENCH_REPS                 repetitions; medians are reported (3)
//	BENCH_LARGE_VIRTUAL        the large sparse image's virtual size (8GiB)
//	BENCH_LARGE_DATA           data written into it (1GiB)
//	BENCH_VERYSPARSE_VIRTUAL   the very sparse large image's virtual size (64GiB)
//	BENCH_VERYSPARSE_DATA      data written into it (1GiB)
//	BENCH_OVERHEAD_IMAGES      small images sent one at a time (10)
//	BENCH_BURST_IMAGES         images in the burst, 256MiB-1GiB virtual with 32-128MiB of data each (100)
//	BENCH_BURST_CONCURRENCY    jobs per replica in the burst, and bare stages at a time (2)
//	BENCH_MEMORY_SIZES         virtual sizes for the memory check (1GiB,8GiB,64GiB)
//	BENCH_MEMORY_DATA          data in each of those images (64MiB)
//	BENCH_ZEROPARTS_SIZE       zeros stored each way in the zero-parts measurement (4GiB)
//	BENCH_ONLY                 run only these parts, e.g. large,verysparse,micro
//	                           (all of large, verysparse, overhead, burst, memory, sync, zeroparts, micro)
//	BENCH_DIR                  where to work; needs room for the sparse images' outputs (OS temp dir)
//	BENCH_KEEP                 keep the work dir, with every process's log, when set
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/bench"
	"github.com/imagepipe/imagepipe/internal/scratch"
	"github.com/imagepipe/imagepipe/test/stack"
)

func main() {
	testing.Init()
	out := flag.String("out", "bench/REPORT.md", "where to write the report")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if err := run(ctx, *out); err != nil {
		log.Fatal(err)
	}
}

func run(ctx context.Context, out string) error {
	cfg := bench.Config{
		Reps:           envInt("BENCH_REPS", 3),
		OverheadImages: envInt("BENCH_OVERHEAD_IMAGES", 10), BurstImages: envInt("BENCH_BURST_IMAGES", 100),
		BurstConcurrency: envInt("BENCH_BURST_CONCURRENCY", 2),
		Logf:             log.Printf,
	}
	var err error
	if cfg.LargeVirtual, err = envSize("BENCH_LARGE_VIRTUAL", "8GiB"); err != nil {
		return err
	}
	if cfg.LargeData, err = envSize("BENCH_LARGE_DATA", "1GiB"); err != nil {
		return err
	}
	if cfg.VerySparseVirtual, err = envSize("BENCH_VERYSPARSE_VIRTUAL", "64GiB"); err != nil {
		return err
	}
	if cfg.VerySparseData, err = envSize("BENCH_VERYSPARSE_DATA", "1GiB"); err != nil {
		return err
	}
	if cfg.MemoryData, err = envSize("BENCH_MEMORY_DATA", "64MiB"); err != nil {
		return err
	}
	for _, s := range strings.Split(envString("BENCH_MEMORY_SIZES", "1GiB,8GiB,64GiB"), ",") {
		n, err := parseSize(s)
		if err != nil {
			return fmt.Errorf("BENCH_MEMORY_SIZES: %w", err)
		}
		cfg.MemorySizes = append(cfg.MemorySizes, n)
	}
	only := map[string]bool{}
	for _, p := range strings.Split(envString("BENCH_ONLY", "large,verysparse,overhead,burst,memory,sync,zeroparts,micro"), ",") {
		only[strings.TrimSpace(strings.ToLower(p))] = true
	}
	if err := stack.CheckTools(); err != nil {
		return err
	}

	dir, err := os.MkdirTemp(os.Getenv("BENCH_DIR"), "imagepipe-bench-")
	if err != nil {
		return err
	}
	if os.Getenv("BENCH_KEEP") == "" {
		defer os.RemoveAll(dir)
	} else {
		log.Printf("work dir and logs kept in %s", dir)
	}
	cfg.Dir = dir
	if err := checkRoom(dir, cfg, only); err != nil {
		return err
	}
	rep := &bench.Report{Started: time.Now(), Config: cfg, Machine: bench.DescribeMachine(ctx, dir)}
	if only["sync"] {
		// Its own servers, before the stack starts: nothing else runs.
		if rep.Sync, err = bench.RunSync(ctx, filepath.Join(dir, "sync"), filepath.Join("infra", "nats"), log.Printf); err != nil {
			return err
		}
	}
	if only["zeroparts"] {
		// Its own MinIO too, before the stack starts.
		size, err := envSize("BENCH_ZEROPARTS_SIZE", "4GiB")
		if err != nil {
			return err
		}
		log.Print("storing runs of zeros")
		if rep.ZeroParts, err = bench.RunZeroParts(ctx, filepath.Join(dir, "zeroparts"), size, []int64{128 << 20, 1 << 30}, cfg.Reps, log.Printf); err != nil {
			return fmt.Errorf("zero parts: %w", err)
		}
		_ = os.RemoveAll(filepath.Join(dir, "zeroparts"))
	}
	var r *bench.Runner
	if only["large"] || only["verysparse"] || only["overhead"] || only["burst"] || only["memory"] {
		if cfg.Binary, err = stack.Build(ctx, dir); err != nil {
			return err
		}
		rep.Config.Binary = cfg.Binary
		if r, err = bench.NewRunner(ctx, cfg); err != nil {
			return err
		}
		defer r.Close()
	}
	if only["micro"] {
		log.Print("micro-benchmarks")
		if rep.Micro, err = bench.RunMicro(ctx, filepath.Join(dir, "micro")); err != nil {
			return err
		}
	}
	// Each part's files go when it ends, so that the next finds the disk
	// as the first did. Memory runs right after the very sparse image:
	// its largest conversion needs as much scratch space, which the
	// burst's leftovers in MinIO may still hold for a while.
	parts := []struct {
		name string
		run  func() error
	}{
		{"large", func() (err error) {
			rep.Large, err = r.RunSparse(ctx, "large", cfg.LargeVirtual, cfg.LargeData)
			return err
		}},
		{"verysparse", func() (err error) {
			rep.VerySparse, err = r.RunSparse(ctx, "verysparse", cfg.VerySparseVirtual, cfg.VerySparseData)
			return err
		}},
		{"memory", func() (err error) { rep.Memory, err = r.RunMemory(ctx); return err }},
		{"overhead", func() (err error) { rep.Overhead, err = r.RunOverhead(ctx); return err }},
		{"burst", func() (err error) { rep.Burst, err = r.RunBurst(ctx); return err }},
	}
	for _, p := range parts {
		if !only[p.name] {
			continue
		}
		if free, _, err := scratch.DiskSpace(dir); err == nil {
			log.Printf("%s: %.1f GiB free in %s", p.name, gib(free), dir)
		}
		if err := p.run(); err != nil {
			return fmt.Errorf("%s: %w", p.name, err)
		}
		if err := os.RemoveAll(filepath.Join(dir, p.name)); err != nil {
			return err
		}
	}
	rep.Took = time.Since(rep.Started)
	rep.Machine.LoadEnd = bench.DescribeMachine(ctx, dir).LoadAvg

	f, err := os.Create(out)
	if err != nil {
		return err
	}
	if err := rep.Write(f); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	log.Printf("wrote %s in %s", out, rep.Took.Round(time.Second))
	return nil
}

func envString(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// benchHeadroom is what the bench's own files (inputs, their copies in
// MinIO, the baselines' sparse outputs) take beside the largest output
// being converted.
const benchHeadroom = 4 << 30

// checkRoom refuses to start a run that would stall: convert waits, and
// retries after a back-off, until its scratch file system has the disk's
// whole virtual size free (rule scratch-space), and a run whose timings
// include that back-off measures nothing.
func checkRoom(dir string, cfg bench.Config, only map[string]bool) error {
	var largest int64
	if only["large"] {
		largest = max(largest, cfg.LargeVirtual)
	}
	if only["verysparse"] {
		largest = max(largest, cfg.VerySparseVirtual)
	}
	if only["memory"] {
		for _, s := range cfg.MemorySizes {
			largest = max(largest, s)
		}
	}
	if largest == 0 {
		return nil
	}
	free, _, err := scratch.DiskSpace(dir)
	if err != nil {
		return nil // unknown here; convert's own check still holds
	}
	if need := largest + benchHeadroom; free < need {
		return fmt.Errorf("%s has %.1f GiB free; the largest image's conversion needs its virtual size free in scratch, %.1f GiB, plus %.0f GiB for the bench's own files: free space there, set BENCH_DIR to a larger disk, or lower BENCH_VERYSPARSE_VIRTUAL and BENCH_MEMORY_SIZES",
			dir, gib(free), gib(largest), gib(benchHeadroom))
	}
	return nil
}

func gib(n int64) float64 { return float64(n) / (1 << 30) }

func envInt(name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		log.Fatalf("%s=%q: want a positive number", name, v)
	}
	return n
}

func envSize(name, def string) (int64, error) {
	n, err := parseSize(envString(name, def))
	if err != nil {
		return 0, fmt.Errorf("%s: %w", name, err)
	}
	return n, nil
}

// parseSize reads "8GiB", "512MiB", "64KiB" or a plain byte count.
func parseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if rest, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = rest, u.mult
			break
		}
	}
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("size %q: want e.g. 8GiB, 512MiB or a byte count", s)
	}
	return n * mult, nil
}
