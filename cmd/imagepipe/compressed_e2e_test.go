package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/convert"
	"github.com/imagepipe/imagepipe/internal/decompress/decompresstest"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
	"github.com/imagepipe/imagepipe/internal/setup"
	"github.com/imagepipe/imagepipe/internal/status"
)

// compressFile writes path compressed with codec ("gz", "xz" or "zst")
// beside it, named with the codec's suffix, and returns the new path.
func compressFile(t *testing.T, path, codec string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	out := path + "." + codec
	if err := os.WriteFile(out, compress(t, codec, data), 0o600); err != nil {
		t.Fatal(err)
	}
	return out
}

// isolatedConverter is a convert handler of its own, with cfg changed by
// tweak, on the e2e stack's MinIO, JetStream status bucket and qemu-img,
// reading from a bucket of its own that ingest never watches. The shared
// replica's settings stay as they are.
type isolatedConverter struct {
	h       *convert.Handler
	bucket  string
	scratch string
}

func newIsolatedConverter(t *testing.T, bucket string, tweak func(*convert.Config)) *isolatedConverter {
	t.Helper()
	ctx := context.Background()
	for _, b := range []string{bucket, bucket + "-out"} {
		if err := e2e.s3.MakeBucket(ctx, b, minio.MakeBucketOptions{}); err != nil {
			if exists, _ := e2e.s3.BucketExists(ctx, b); !exists {
				t.Fatal(err)
			}
		}
	}
	store, err := objstore.New(e2e.stack.s.S3)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := setup.StatusKV(ctx, e2e.js, 1)
	if err != nil {
		t.Fatal(err)
	}
	cfg := e2e.stack.s.Convert
	cfg.ScratchDir = t.TempDir()
	cfg.OutputBucket = bucket + "-out"
	cfg.OutputPrefix = ""
	tweak(&cfg)
	log := slog.New(slog.DiscardHandler)
	h := convert.New(cfg, store, qemuimg.New(log), status.New(kv, nil), nil, log)
	return &isolatedConverter{h: h, bucket: bucket, scratch: cfg.ScratchDir}
}

// convert uploads body at key and runs one delivery of its job, returning
// its failure event, or nil if it converted. peak is the most disk the
// scratch directory took while the job ran.
func (c *isolatedConverter) convert(t *testing.T, key string, body []byte) (failed *events.Failed, peak int64) {
	t.Helper()
	ctx := context.Background()
	info, err := e2e.s3.PutObject(ctx, c.bucket, key, bytes.NewReader(body), int64(len(body)), minio.PutObjectOptions{DisableMultipart: true})
	if err != nil {
		t.Fatal(err)
	}
	stop := watchScratch(c.scratch)
	out, _ := c.h.Handle(ctx, events.ConvertJob{JobID: "compressed-" + key, Bucket: c.bucket, Key: key, VersionID: info.VersionID,
		ETag: info.ETag, Size: info.Size, Reason: "upload", QueuedAt: time.Now()}, 1, 4)
	peak = stop()
	if len(out) == 0 {
		t.Fatalf("job for %s published nothing", key)
	}
	if out[0].Event.Type != events.TypeFailed {
		return nil, peak
	}
	var f events.Failed
	if err := out[0].Event.DecodeData(events.TypeFailed, &f); err != nil {
		t.Fatal(err)
	}
	return &f, peak
}

// watchScratch samples the disk space dir's files take until the returned
// function is called, which returns the largest sample.
func watchScratch(dir string) (stop func() int64) {
	var (
		peak int64
		wg   sync.WaitGroup
	)
	done := make(chan struct{})
	sample := func() {
		var total int64
		_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
			if err == nil {
				if info, ierr := d.Info(); ierr == nil {
					total += diskBytes(info)
				}
			}
			return nil
		})
		peak = max(peak, total)
	}
	wg.Go(func() {
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			sample()
			select {
			case <-done:
				return
			case <-tick.C:
			}
		}
	})
	return func() int64 {
		close(done)
		wg.Wait()
		return peak
	}
}

// fsBytes is the size of the file system holding dir.
func fsBytes(t *testing.T, dir string) int64 {
	t.Helper()
	size, err := fileSystemSize(dir)
	if err != nil {
		t.Fatal(err)
	}
	return size
}

func TestCompressedBombIsRefusedByRuleWithoutFillingScratch(t *testing.T) {
	t.Run("zeros past the virtual size limit take no scratch space", func(t *testing.T) {
		// 1 GiB of zeros in 32 KiB of zstd, against a 256 MiB limit.
		c := newIsolatedConverter(t, "compressed-bombs", func(cfg *convert.Config) { cfg.MaxVirtualSize = 256 << 20 })
		f, peak := c.convert(t, "bombs/zeros.img.zst", decompresstest.ZstdRun(0, 1<<30))
		if f == nil || f.Rule != "virtual-size" || f.WillRetry || f.Phase != events.PhaseDownload {
			t.Fatalf("failed = %+v, want a refusal by rule virtual-size in download, not retried", f)
		}
		if peak > 16<<20 {
			t.Errorf("scratch took %d bytes while expanding zeros, want none: zeros must be holes", peak)
		}
	})
	t.Run("data that can never fit the scratch space is refused, not retried", func(t *testing.T) {
		// 4 GiB of 0x5a in 128 KiB of zstd, on a scratch file system that
		// holds 64 MiB beyond the reserve even when nothing else is on it.
		var scratch string
		c := newIsolatedConverter(t, "compressed-bombs", func(cfg *convert.Config) {
			scratch = cfg.ScratchDir
			cfg.ScratchReserve = fsBytes(t, scratch) - 64<<20
		})
		f, peak := c.convert(t, "bombs/data.img.zst", decompresstest.ZstdRun(0x5a, 4<<30))
		if f == nil || f.Rule != "scratch-space" || f.WillRetry || f.Phase != events.PhaseDownload || f.Suggestion == "" {
			t.Fatalf("failed = %+v, want a refusal by rule scratch-space in download, not retried, with a suggestion", f)
		}
		// The room is 64 MiB; others share the disk, so allow for them.
		if peak > 512<<20 {
			t.Errorf("scratch took %d bytes before the refusal, want no more than the room", peak)
		}
		if entries, _ := os.ReadDir(scratch); len(entries) != 0 {
			t.Errorf("the refused job left %d entries in scratch", len(entries))
		}
		if objectExists(t, c.bucket+"-out", "bombs/data.img.zst.raw") {
			t.Error("an output exists for a refused upload")
		}
	})
}

var (
	sizeRe      = regexp.MustCompile(`\bsize=(\d+)`)
	allocatedRe = regexp.MustCompile(`\ballocated=(\d+)`)
)

// downloadedSizes reads the content size and the disk space of a job's
// scratch copy from its download log line.
func downloadedSizes(t *testing.T, jobID string) (size, allocated int64) {
	t.Helper()
	line := logLine(t, jobID, "msg=downloaded")
	sm, am := sizeRe.FindStringSubmatch(line), allocatedRe.FindStringSubmatch(line)
	if sm == nil || am == nil {
		t.Fatalf("no download line with sizes for job %s: %q", jobID, line)
	}
	size, _ = strconv.ParseInt(sm[1], 10, 64)
	allocated, _ = strconv.ParseInt(am[1], 10, 64)
	return size, allocated
}

func TestCompressedMostlyZeroImageConvertsExactlyWithASparseScratchCopy(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.img")
	runTool(t, "qemu-img", "create", "-q", "-f", "raw", raw, "256M")
	runTool(t, "qemu-io", "-f", "raw", "-c", "write -P 0x61 0 1M", "-c", "write -P 0x62 100M 2M", "-c", "write -P 0x63 255M 1M", raw)
	want, wantSize := localRaw(t, raw, "raw")
	body := compressFile(t, raw, "zst")

	res := subscribeResults(t)
	key := "e2e/compressed/disk.img.zst"
	upload(t, key, body, false)
	ev := res.await(t, key, 90*time.Second)
	var c events.Converted
	if err := ev.DecodeData(events.TypeConverted, &c); err != nil {
		t.Fatalf("%v: %s", err, ev.Data)
	}
	if c.SHA256 != want || c.VirtualSize != wantSize || c.InputFormat != "raw" {
		t.Errorf("converted = %+v, want sha256 %s of %d bytes, as qemu-img converts the uncompressed file", c, want, wantSize)
	}
	if got, size := downloadSum(t, c.OutputBucket, c.OutputKey); got != want || size != wantSize {
		t.Errorf("stored output sha256 %s size %d, want %s size %d", got, size, want, wantSize)
	}
	// 4 MiB of data in 256 MiB: the scratch copy holds the data, not the
	// zeros.
	size, allocated := downloadedSizes(t, c.JobID)
	if size != 256<<20 || allocated > 8<<20 {
		t.Errorf("scratch copy: %d bytes of content, %d allocated; want 256 MiB with only its 4 MiB of data allocated", size, allocated)
	}
}

func TestInspectJudgesCompressedImagesAsConvertDoes(t *testing.T) {
	dir := t.TempDir()
	qcow2 := makeImage(t, dir, "good.qcow2", "qcow2", "write -P 0x71 0 1M", "write -P 0x72 40M 1M")
	vmdk := makeImage(t, dir, "good.vmdk", "vmdk", "write -P 0x73 0 2M")
	base := makeImage(t, dir, "base.qcow2", "qcow2", "write -P 0x74 0 1M")
	top := filepath.Join(dir, "top.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	misnamed := filepath.Join(dir, "misnamed.vhdx")
	if b, err := os.ReadFile(qcow2); err != nil || os.WriteFile(misnamed, b, 0o600) != nil {
		t.Fatal(err)
	}
	vmdkGz := compressFile(t, vmdk, "gz")
	whole, _ := os.ReadFile(vmdkGz)
	truncated := filepath.Join(dir, "truncated.vmdk.gz")
	if err := os.WriteFile(truncated, whole[:len(whole)/2], 0o600); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name, path, rule string // rule "" when accepted
	}{
		{"qcow2 in xz", compressFile(t, qcow2, "xz"), ""},
		{"vmdk in gzip", vmdkGz, ""},
		{"vmdk in zstd", compressFile(t, vmdk, "zst"), ""},
		{"qcow2 with a backing file in xz", compressFile(t, top, "xz"), "backing-file"},
		{"qcow2 named vhdx in gzip", compressFile(t, misnamed, "gz"), "extension-mismatch"},
		{"truncated gzip", truncated, "compressed-stream"},
	}
	res := subscribeResults(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			key := "e2e/compressed-inspect/" + filepath.Base(tc.path)
			upload(t, key, tc.path, false)
			ev := res.await(t, key, 90*time.Second)
			convertRule := ""
			if ev.Type == events.TypeFailed {
				var f events.Failed
				if err := ev.DecodeData(events.TypeFailed, &f); err != nil {
					t.Fatal(err)
				}
				convertRule = f.Rule
				if convertRule == "" {
					convertRule = "(no rule: " + f.Message + ")"
				}
			}
			if convertRule != tc.rule {
				t.Errorf("convert: rule %q, want %q", convertRule, tc.rule)
			}

			r := imagepipe(t, "inspect", "--json", "--key", key, tc.path)
			var rep inspection
			if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
				t.Fatalf("inspect exited %d without a report: %v\n%s%s", r.code, err, r.stdout, r.stderr)
			}
			wantCode, wantVerdict := 0, "accepted"
			if tc.rule != "" {
				wantCode, wantVerdict = 1, "refused"
			}
			if r.code != wantCode || rep.Verdict != wantVerdict || rep.Rule != convertRule || rep.Compression == "" {
				t.Errorf("inspect exited %d with verdict %q rule %q (compression %q); convert said rule %q\n%s", r.code, rep.Verdict, rep.Rule, rep.Compression, convertRule, r.stderr)
			}
		})
	}

	t.Run("bomb past the virtual size limit", func(t *testing.T) {
		t.Setenv("IMAGEPIPE_MAX_VIRTUAL_SIZE", strconv.Itoa(256<<20))
		bomb := filepath.Join(dir, "zeros.img.zst")
		if err := os.WriteFile(bomb, decompresstest.ZstdRun(0, 1<<30), 0o600); err != nil {
			t.Fatal(err)
		}
		c := newIsolatedConverter(t, "compressed-inspect", func(cfg *convert.Config) { cfg.MaxVirtualSize = 256 << 20 })
		body, _ := os.ReadFile(bomb)
		f, _ := c.convert(t, "zeros.img.zst", body)
		r := imagepipe(t, "inspect", "--json", bomb)
		var rep inspection
		if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil {
			t.Fatalf("inspect exited %d without a report: %v\n%s%s", r.code, err, r.stdout, r.stderr)
		}
		if f == nil || f.Rule != "virtual-size" || r.code != 1 || rep.Rule != f.Rule {
			t.Errorf("convert failed %+v; inspect exited %d with rule %q", f, r.code, rep.Rule)
		}
	})
}
