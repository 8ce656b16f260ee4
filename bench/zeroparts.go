package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/minioserver"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/scratch"
	"github.com/imagepipe/imagepipe/test/stack"
)

// ZeroParts measures what storing a run of zeros costs: sent as parts, as
// before, or copied server-side from the zero object, with zero objects of
// several sizes (the longest part one copy makes). Its own MinIO, with
// compression of .raw objects as `imagepipe dev` runs it, so that nothing
// else's CPU is counted as MinIO's.
type ZeroParts struct {
	Zeros int64 // bytes of zeros stored each way
	Runs  []ZeroRun
}

// ZeroRun is one way of storing the zeros.
type ZeroRun struct {
	How string
	// ZeroObject is the zero object's size; 0 when the zeros are sent.
	ZeroObject int64
	Wall       time.Duration
	MinIOCPU   time.Duration
	MachineCPU time.Duration
	// ZeroObjectWrite is what writing the zero object took, once.
	ZeroObjectWrite time.Duration
	// Stored is the bytes MinIO keeps on disk for the object (compressed).
	Stored int64
}

// RunZeroParts stores size bytes of zeros each way, each reps times, and
// keeps the median of each.
func RunZeroParts(ctx context.Context, dir string, size int64, zeroSizes []int64, reps int, logf func(string, ...any)) (*ZeroParts, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	const access, secret = "bench-zero", "bench-zero-secret"
	ms, err := minioserver.Start(ctx, minioserver.Options{DataDir: filepath.Join(dir, "minio"), AccessKey: access, SecretKey: secret, Compress: true})
	if err != nil {
		return nil, err
	}
	defer ms.Stop()
	// A sparse file of nothing but holes, as qemu-img leaves a mostly
	// empty raw output.
	path := filepath.Join(dir, "zeros.raw")
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := f.Truncate(size); err != nil {
		f.Close()
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	defer os.Remove(path)

	z := &ZeroParts{Zeros: size}
	ways := []int64{0}
	ways = append(ways, zeroSizes...)
	for i, zs := range ways {
		st, err := objstore.New(objstore.Config{Endpoint: ms.Endpoint, AccessKey: access, SecretKey: secret, ZeroObjectSize: zs})
		if err != nil {
			return nil, err
		}
		bucket := fmt.Sprintf("zeros-%d", i)
		if err := st.Client().MakeBucket(ctx, bucket, minio.MakeBucketOptions{}); err != nil {
			return nil, err
		}
		run := ZeroRun{How: "sent as 128 MiB parts", ZeroObject: zs}
		if zs > 0 {
			run.How = fmt.Sprintf("copied from a %s zero object", mib(zs))
		}
		var walls, minios, machines []time.Duration
		for rep := range reps + 1 {
			cpu0, start := readCPU(ms.Pid()), time.Now()
			obj, err := storeZeros(ctx, st, bucket, fmt.Sprintf("out-%d.raw", rep), path, zs > 0)
			if err != nil {
				return nil, err
			}
			wall, cpu := time.Since(start), readCPU(ms.Pid()).sub(cpu0)
			if obj.Size != size || (zs > 0) != (obj.ZeroBytes == size) {
				return nil, fmt.Errorf("%s: stored %d bytes, %d of them copied", run.How, obj.Size, obj.ZeroBytes)
			}
			if rep == 0 && zs > 0 {
				// The first copy also writes the zero object: timed apart.
				run.ZeroObjectWrite = wall
				continue
			}
			if rep == 0 {
				continue // warm-up, as for the copies
			}
			walls, minios, machines = append(walls, wall), append(minios, cpu.minio), append(machines, cpu.machine)
		}
		run.Wall, run.MinIOCPU, run.MachineCPU = stack.Median(walls), stack.Median(minios), stack.Median(machines)
		run.Stored = diskUsage(filepath.Join(dir, "minio", bucket))
		logf("zeros %s: %s, MinIO CPU %s, machine CPU %s (zero object written in %s), %s stored",
			run.How, run.Wall.Round(time.Millisecond), run.MinIOCPU.Round(time.Millisecond), run.MachineCPU.Round(time.Millisecond), run.ZeroObjectWrite.Round(time.Millisecond), kib(run.Stored))
		z.Runs = append(z.Runs, run)
	}
	return z, nil
}

// storeZeros uploads the file at path as convert uploads a raw output:
// with its holes copied from the zero object, or without.
func storeZeros(ctx context.Context, st *objstore.Store, bucket, key, path string, copyZeros bool) (objstore.Object, error) {
	f, err := scratch.Open(path)
	if err != nil {
		return objstore.Object{}, err
	}
	defer f.Close()
	var guard objstore.Guard
	if copyZeros {
		holes, err := scratch.OpenHoles(path)
		if err != nil {
			return objstore.Object{}, err
		}
		defer holes.Close()
		guard.Zeros = &objstore.Zeros{Holes: holes, Key: events.ZeroObjectKey("")}
	}
	return st.Upload(ctx, bucket, key, f, nil, nil, guard)
}

// diskUsage is the bytes allocated under dir.
func diskUsage(dir string) int64 {
	var n int64
	filepath.Walk(dir, func(_ string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			n += info.Size()
		}
		return nil
	})
	return n
}

func kib(n int64) string { return fmt.Sprintf("%.0f KiB", float64(n)/1024) }

// writeZeroParts reports RunZeroParts.
func writeZeroParts(p func(string, ...any), z *ZeroParts) {
	p("## Storing runs of zeros\n\n")
	p("%s of zeros (a sparse file of nothing but holes) uploaded as convert uploads a raw output, to a MinIO of its own that compresses `.raw` objects, as `imagepipe dev` runs it: sent as parts, or copied server-side (UploadPartCopy) from the output bucket's zero object, one copied part as long as the zero object. Medians; the first upload of each way is a warm-up, and for copies it also writes the zero object (timed apart). CPU is MinIO's own and the whole machine's; stored is what MinIO keeps on disk for the bucket, the zero object included (it compresses `.raw` objects, zeros to almost nothing).\n\n", mib(z.Zeros))
	p("| how | wall | MinIO CPU | MinIO CPU per GiB | machine CPU | zero object written in | stored |\n| --- | --- | --- | --- | --- | --- | --- |\n")
	gib := float64(z.Zeros) / (1 << 30)
	for _, r := range z.Runs {
		write := "—"
		if r.ZeroObject > 0 {
			write = sec(r.ZeroObjectWrite)
		}
		p("| %s | %s | %s | %.2f s | %s | %s | %s |\n", r.How, sec(r.Wall), sec(r.MinIOCPU), r.MinIOCPU.Seconds()/gib, sec(r.MachineCPU), write, kib(r.Stored))
	}
	p("\n")
}
