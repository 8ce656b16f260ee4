package bench

import (
	"regexp"
	"strings"
	"testing"
	"time"
)

func secs(fs ...float64) []time.Duration {
	out := make([]time.Duration, len(fs))
	for i, f := range fs {
		out[i] = time.Duration(f * float64(time.Second))
	}
	return out
}

// TestReportHeadlineHasEveryFigureWithItsTarget renders a report of every
// part and checks that each figure is a headline row with its target and
// verdict, computed from the runs made side by side.
func TestReportHeadlineHasEveryFigureWithItsTarget(t *testing.T) {
	three := func(fs ...float64) [3][]time.Duration {
		return [3][]time.Duration{secs(fs...), secs(fs...), secs(fs...)}
	}
	sparse := func(name string, virtual int64, pipeline float64) *SparseImage {
		return &SparseImage{
			Name: name, Virtual: virtual, Data: 1 << 30, Baseline: "mc",
			Pipeline: secs(pipeline, pipeline), Sequential: secs(40, 40),
			SeqStages: three(10, 10), Bare: three(5, 5),
			PipelineCPU: []cpuTime{{machine: 30 * time.Second, minio: 10 * time.Second}},
		}
	}
	over := secs(0.040, 0.045, 0.120)
	r := &Report{
		Config:     Config{Reps: 2, LargeVirtual: 8 << 30, LargeData: 1 << 30, VerySparseVirtual: 64 << 30, VerySparseData: 1 << 30, OverheadImages: 3, BurstImages: 4, BurstConcurrency: 2, MemorySizes: []int64{1 << 30, 64 << 30}, MemoryData: 64 << 20},
		Machine:    Machine{Cores: 2},
		Large:      sparse("large", 8<<30, 12),      // 0.30×: met
		VerySparse: sparse("verysparse", 64<<30, 8), // 0.20×: not met
		Overhead: &Overhead{
			Images: 3, Jobs: 3, E2E: secs(1, 1, 1), Qemu: secs(1, 1, 1), Notify: secs(0, 0, 0),
			Overhead: over, Own: over, Stages: make([][]time.Duration, len(Stages)),
		},
		Burst: &Burst{
			Images: 4, Concurrency: 2, MinVirtual: 256 << 20, MaxVirtual: 1 << 30, MinData: 32 << 20, MaxData: 128 << 20, TotalData: 300 << 20,
			Pipeline: secs(20, 25), Bare: secs(10, 10),
			PipelineStages: make([][]time.Duration, len(BurstStages)), BareStages: three(1, 1),
			PipelineCPU: []burstCPU{{machine: 30 * time.Second, qemu: 10 * time.Second, convert: 5 * time.Second}},
			BareCPU:     []burstCPU{{machine: 15 * time.Second, qemu: 10 * time.Second, bench: 2 * time.Second}},
		},
		Memory: &Memory{Data: 64 << 20, Sizes: []int64{1 << 30, 8 << 30, 64 << 30}, Peak: []int64{40 << 20, 41 << 20, 42 << 20}},
	}
	var b strings.Builder
	if err := r.Write(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	headline := out[strings.Index(out, "## Headline"):]
	headline = headline[:strings.Index(headline, "\n\n| | measured |\n")+1]
	for _, want := range []string{
		"| large sparse image (8 GiB virtual, 1 GiB of data): pipeline time ÷ sequential baseline's | 0.30× | ≤ 0.35× | met | 0.30×, 0.30× |",
		"| very sparse large image (64 GiB virtual, 1 GiB of data): pipeline time ÷ sequential baseline's | 0.20× | ≤ 0.15× | **not met** |",
		"| per-job overhead on small images (end to end − qemu-img alone), median | 45 ms | ≤ 50 ms | met |",
		"| per-job overhead on small images (end to end − qemu-img alone), p95 | 120 ms | ≤ 100 ms | **not met** |",
		"| burst of 4 images (256 MiB–1 GiB virtual, 32 MiB–128 MiB of data) at 2 jobs per replica: pipeline throughput ÷ bare stages' | 0.50× | ≥ 0.80× | **not met** | 0.50×, 0.40× |",
		"| convert replica peak RSS, 64 GiB ÷ 1 GiB virtual | 1.05× (largest 42 MiB) | flat (≤ 1.20×), every peak < 100 MiB | met |",
	} {
		hasLine(t, out, want)
	}
	// Every headline row names a target and a verdict.
	verdict := regexp.MustCompile(`\| [^|]*[≤≥<][^|]* \| (met|\*\*not met\*\*) \|`)
	for _, line := range strings.Split(headline, "\n") {
		if strings.HasPrefix(line, "| ") && !strings.HasPrefix(line, "| |") && !strings.HasPrefix(line, "| ---") && !verdict.MatchString(line) {
			t.Errorf("headline row without a verdict: %s", line)
		}
	}
	// The burst's section says where the CPU went.
	for _, want := range []string{"| qemu-img | 10.0 s | 10.0 s |", "| whole machine | 30.0 s | 15.0 s |"} {
		hasLine(t, out, want)
	}
	if m := regexp.MustCompile(`\bP[1-4]\b`).FindString(out); m != "" {
		t.Errorf("report refers to a figure by number (%s) instead of by what it measures", m)
	}
}

// TestBurstSpecsSpanTheRange checks that a burst's images are varied over
// 256 MiB–1 GiB virtual and 32–128 MiB of data, the same every run.
func TestBurstSpecsSpanTheRange(t *testing.T) {
	specs := burstSpecs(100)
	lo, hi := specs[0], specs[0]
	for i, s := range specs {
		if s.Virtual < 256<<20 || s.Virtual > 1<<30 || s.Data < 32<<20 || s.Data > 128<<20 {
			t.Errorf("image %d: %d MiB virtual with %d MiB of data, outside the range", i, s.Virtual>>20, s.Data>>20)
		}
		lo.Virtual, hi.Virtual = min(lo.Virtual, s.Virtual), max(hi.Virtual, s.Virtual)
		lo.Data, hi.Data = min(lo.Data, s.Data), max(hi.Data, s.Data)
	}
	if lo.Virtual > 300<<20 || hi.Virtual < 1000<<20 || lo.Data > 40<<20 || hi.Data < 120<<20 {
		t.Errorf("100 images span only %d–%d MiB virtual and %d–%d MiB of data", lo.Virtual>>20, hi.Virtual>>20, lo.Data>>20, hi.Data>>20)
	}
	if again := burstSpecs(100); again[57] != specs[57] {
		t.Errorf("burst images differ between runs: %+v then %+v", specs[57], again[57])
	}
}

// TestReportShowsWhatDurableAcknowledgementsCost renders the sync part:
// each target's per-job time and throughput with both settings, and the
// ratios against the default measured in the same run.
func TestReportShowsWhatDurableAcknowledgementsCost(t *testing.T) {
	r := &Report{Sync: &Sync{Rounds: 3, SeqJobs: 20, Workers: 8, BurstJobs: 100, JobWrites: 9, Targets: []SyncTarget{
		{Name: "embedded server", Default: SyncFigures{PerJob: secs(0.0008, 0.001, 0.0012), Burst: secs(0.04, 0.05, 0.06)},
			Always: SyncFigures{PerJob: secs(0.006, 0.007, 0.008), Burst: secs(0.4, 0.5, 0.6)}},
		{Name: "three-node cluster, 3 replicas", Default: SyncFigures{PerJob: secs(0.003, 0.003, 0.003), Burst: secs(0.125, 0.125, 0.125)},
			Always: SyncFigures{PerJob: secs(0.012, 0.012, 0.012), Burst: secs(0.5, 0.5, 0.5)}},
	}}}
	var b strings.Builder
	if err := r.Write(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"## Durable acknowledgements: `sync_interval: always`",
		"A job here is the 9 acknowledged writes one successful image makes",
		"| embedded server | 1.0 ms | 7.0 ms | 7.00× | 2000 | 200 | 0.10× |",
		"| three-node cluster, 3 replicas | 3.0 ms | 12.0 ms | 4.00× | 800 | 200 | 0.25× |",
	} {
		hasLine(t, out, want)
	}
}

// hasLine fails the test unless the report out holds want.
func hasLine(t *testing.T, out, want string) {
	t.Helper()
	if !strings.Contains(out, want) {
		t.Errorf("report lacks\n%s\nin\n%s", want, out)
	}
}
