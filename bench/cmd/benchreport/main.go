// Command benchreport runs imagepipe's benchmarks against their baselines
// on the real stack and writes bench/REPORT.md. `go tool task bench` runs
// it. Sizes come from the environment so that a run can be scaled down:
//
//	BENCH_REPS            repetitions; medians are reported (3)
//	BENCH_P1_VIRTUAL      P1 image's virtual size (8GiB)
//	BENCH_P1_DATA         data written into it (1GiB)
//	BENCH_P2_IMAGES       small images sent one at a time (10)
//	BENCH_P3_IMAGES       images in the burst (16)
//	BENCH_P3_CONCURRENCY  jobs per replica in the burst (2)
//	BENCH_P4_SIZES        virtual sizes for the memory check (1GiB,20GiB)
//	BENCH_P4_DATA         data in each of those images (64MiB)
//	BENCH_ONLY            run only these parts, e.g. p1,micro or sync (all)
//	BENCH_DIR             where to work; needs room for the P1 outputs (OS temp dir)
//	BENCH_KEEP            keep the work dir, with every process's log, when set
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
		Reps:     envInt("BENCH_REPS", 3),
		P2Images: envInt("BENCH_P2_IMAGES", 10), P3Images: envInt("BENCH_P3_IMAGES", 16),
		P3Concurrency: envInt("BENCH_P3_CONCURRENCY", 2),
		Logf:          log.Printf,
	}
	var err error
	if cfg.P1Virtual, err = envSize("BENCH_P1_VIRTUAL", "8GiB"); err != nil {
		return err
	}
	if cfg.P1Data, err = envSize("BENCH_P1_DATA", "1GiB"); err != nil {
		return err
	}
	if cfg.P4Data, err = envSize("BENCH_P4_DATA", "64MiB"); err != nil {
		return err
	}
	for _, s := range strings.Split(envString("BENCH_P4_SIZES", "1GiB,20GiB"), ",") {
		n, err := parseSize(s)
		if err != nil {
			return fmt.Errorf("BENCH_P4_SIZES: %w", err)
		}
		cfg.P4Sizes = append(cfg.P4Sizes, n)
	}
	only := map[string]bool{}
	for _, p := range strings.Split(envString("BENCH_ONLY", "p1,p2,p3,p4,sync,micro"), ",") {
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
	rep := &bench.Report{Started: time.Now(), Config: cfg, Machine: bench.DescribeMachine(ctx, dir)}
	if only["sync"] {
		// Its own servers, before the stack starts: nothing else runs.
		if rep.Sync, err = bench.RunSync(ctx, filepath.Join(dir, "sync"), filepath.Join("infra", "nats"), log.Printf); err != nil {
			return err
		}
	}
	var r *bench.Runner
	if only["p1"] || only["p2"] || only["p3"] || only["p4"] {
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
	if only["p1"] {
		if rep.P1, err = r.RunP1(ctx); err != nil {
			return fmt.Errorf("P1: %w", err)
		}
	}
	if only["p2"] {
		if rep.P2, err = r.RunP2(ctx); err != nil {
			return fmt.Errorf("P2: %w", err)
		}
	}
	if only["p3"] {
		if rep.P3, err = r.RunP3(ctx); err != nil {
			return fmt.Errorf("P3: %w", err)
		}
	}
	if only["p4"] {
		if rep.P4, err = r.RunP4(ctx); err != nil {
			return fmt.Errorf("P4: %w", err)
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
