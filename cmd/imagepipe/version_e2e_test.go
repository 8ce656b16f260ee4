package main

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/minio/minio-go/v7"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/convert"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
	"github.com/imagepipe/imagepipe/internal/setup"
	"github.com/imagepipe/imagepipe/internal/status"
)

// heldStore is the real object store, except that the first write of an
// output waits until the test lets it go: the job is then in flight with
// its input downloaded and converted, for as long as the test needs.
type heldStore struct {
	convert.Storage
	reached chan struct{} // closed when the write is about to start
	release chan struct{} // closed by the test to let it start
}

func newHeldStore(s convert.Storage) *heldStore {
	return &heldStore{Storage: s, reached: make(chan struct{}), release: make(chan struct{})}
}

func (s *heldStore) hold(ctx context.Context) error {
	close(s.reached)
	select {
	case <-s.release:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (s *heldStore) Upload(ctx context.Context, bucket, key string, f objstore.File, meta map[string]string, progress io.Reader, guard objstore.Guard) (objstore.Object, error) {
	if err := s.hold(ctx); err != nil {
		return objstore.Object{}, err
	}
	return s.Storage.Upload(ctx, bucket, key, f, meta, progress, guard)
}

func (s *heldStore) UploadGrowing(ctx context.Context, bucket, key string, src objstore.Growing, size int64, meta map[string]string, progress io.Reader, guard objstore.Guard) (objstore.Object, error) {
	if err := s.hold(ctx); err != nil {
		return objstore.Object{}, err
	}
	return s.Storage.UploadGrowing(ctx, bucket, key, src, size, meta, progress, guard)
}

func (s *heldStore) Copy(ctx context.Context, srcBucket, srcKey, srcVersion, srcETag, dstBucket, dstKey string, meta, tags map[string]string, guard objstore.Guard) (objstore.Object, error) {
	if err := s.hold(ctx); err != nil {
		return objstore.Object{}, err
	}
	return s.Storage.Copy(ctx, srcBucket, srcKey, srcVersion, srcETag, dstBucket, dstKey, meta, tags, guard)
}

// heldConverter is a second convert replica on the stack's MinIO, NATS
// status and qemu-img, whose output writes wait for the test.
func heldConverter(t *testing.T) (*convert.Handler, *heldStore) {
	t.Helper()
	real, err := objstore.New(e2e.stack.s.S3)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := setup.StatusKV(context.Background(), e2e.js, 1)
	if err != nil {
		t.Fatal(err)
	}
	cfg := e2e.stack.s.Convert
	cfg.ScratchDir = t.TempDir()
	held := newHeldStore(real)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	return convert.New(cfg, held, qemuimg.New(log), status.New(kv, e2e.nc), nil, log), held
}

// heldOutcome is how a held job ended.
type heldOutcome struct {
	out []events.Message
	err error
}

// reconvertHeld uploads v1 as key and waits for its conversion, then runs
// a second conversion of that first version, as `imagepipe reconvert`
// queues one, on a replica whose output write waits. It returns once that
// job reached the write: the test lets it go on by closing held.release
// and reads how it ended from done.
func reconvertHeld(t *testing.T, res *results, key, v1 string) (older events.ConvertJob, held *heldStore, done <-chan heldOutcome) {
	t.Helper()
	upload(t, key, v1, false)
	if ev := res.await(t, key, 120*time.Second); ev.Type != events.TypeConverted {
		t.Fatalf("first version: %s %s", ev.Type, ev.Data)
	}
	first, err := e2e.s3.StatObject(context.Background(), "uploads", key, minio.StatObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	h, held := heldConverter(t)
	older = events.ConvertJob{JobID: uuid.NewString(), Bucket: "uploads", Key: key,
		VersionID: first.VersionID, ETag: first.ETag, Size: first.Size, Reason: "reconvert", NoDedup: true}
	ended := make(chan heldOutcome, 1)
	ctx, cancel := context.WithTimeout(context.Background(), scaled(5*time.Minute))
	t.Cleanup(cancel)
	go func() {
		out, err := h.Handle(ctx, older, 1, 4)
		ended <- heldOutcome{out, err}
	}()
	select {
	case <-held.reached:
	case o := <-ended:
		t.Fatalf("the older job ended before writing its output: %v %v", o.out, o.err)
	case <-time.After(scaled(120 * time.Second)):
		t.Fatal("the older job never reached its output write")
	}
	return older, held, ended
}

func writeFile(t *testing.T, dir, name string, data []byte) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// An upload is overwritten while the job of its first version is in
// flight. The first version's job is held just before it writes its
// output, until the second version's job has converted and published;
// then it goes on, and finishes last. The output must stay the newer
// version's, as the newer result event says, and the older job must end
// without a result or a READY of its own.
func TestOlderVersionFinishingLastLeavesTheNewerVersionsOutput(t *testing.T) {
	cases := []struct {
		name, ext, format, size string
	}{
		// 64 MiB of raw output: uploaded once converted.
		{"uploaded after conversion", "qcow2", "qcow2", "64M"},
		// More than one 128 MiB part: uploaded while qemu-img writes it.
		{"streamed while converting", "vhdx", "vhdx", "192M"},
		// A raw upload: copied server-side.
		{"raw copied server-side", "raw", "", ""},
	}
	res := subscribeResults(t)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			key := "e2e/versions/" + tc.ext + "/disk." + tc.ext
			var v1, v2 string
			if tc.format == "" {
				v1 = writeFile(t, dir, "v1.raw", patterned(6<<20, 0x11))
				v2 = writeFile(t, dir, "v2.raw", patterned(6<<20, 0x22))
			} else {
				v1 = makeSizedImage(t, dir, "v1."+tc.ext, tc.format, tc.size, "write -P 0x11 0 1M", "write -P 0x12 40M 1M")
				v2 = makeSizedImage(t, dir, "v2."+tc.ext, tc.format, tc.size, "write -P 0x21 0 1M", "write -P 0x22 50M 2M")
			}
			rawFormat := tc.format
			if rawFormat == "" {
				rawFormat = "raw"
			}
			want1, _ := localRaw(t, v1, rawFormat)
			want2, _ := localRaw(t, v2, rawFormat)

			_, held, done := reconvertHeld(t, res, key, v1)

			upload(t, key, v2, false)
			ev := res.await(t, key, 120*time.Second)
			var newer events.Converted
			if err := ev.DecodeData(events.TypeConverted, &newer); err != nil {
				t.Fatalf("second version: %s %s: %v", ev.Type, ev.Data, err)
			}
			if newer.SHA256 != want2 {
				t.Fatalf("second version's event sha256 %s, want %s", newer.SHA256, want2)
			}

			close(held.release)
			o := <-done
			if o.err != nil || len(o.out) != 0 {
				t.Errorf("the older job ended with %d events and error %v; want a quiet end, superseded", len(o.out), o.err)
			}
			for _, m := range o.out {
				t.Logf("older job's event: %s %s", m.Subject, m.Event.Data)
			}

			got, _ := downloadSum(t, newer.OutputBucket, newer.OutputKey)
			switch got {
			case want2:
			case want1:
				t.Errorf("output %s/%s holds the first version: the older job overwrote the newer output", newer.OutputBucket, newer.OutputKey)
			default:
				t.Errorf("output %s/%s has sha256 %s, want the second version's %s", newer.OutputBucket, newer.OutputKey, got, want2)
			}
			second, err := e2e.s3.StatObject(context.Background(), "uploads", key, minio.StatObjectOptions{})
			if err != nil {
				t.Fatal(err)
			}
			out, err := e2e.s3.StatObject(context.Background(), newer.OutputBucket, newer.OutputKey, minio.StatObjectOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if m := out.UserMetadata; m["Imagepipe-Job"] != newer.JobID || m["Imagepipe-Source-Etag"] != second.ETag {
				t.Errorf("output metadata %v, want job %s from source ETag %s", m, newer.JobID, second.ETag)
			}
			tags, err := e2e.s3.GetObjectTagging(context.Background(), newer.OutputBucket, newer.OutputKey, minio.GetObjectTaggingOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if sum := tags.ToMap()[events.TagSHA256]; sum != want2 {
				t.Errorf("output tagged sha256 %q, want %s", sum, want2)
			}
			if st := statusOf(t, "uploads", key); st.State != events.StateReady || st.JobID != newer.JobID || st.OutputKey != newer.OutputKey {
				t.Errorf("status %+v, want READY of the second version's job %s", st, newer.JobID)
			}
		})
	}
}

// makeSizedImage is makeImage with a virtual size of the test's choosing.
func makeSizedImage(t *testing.T, dir, name, format, size string, writes ...string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	runTool(t, "qemu-img", "create", "-q", "-f", format, path, size)
	args := []string{"-f", format}
	for _, w := range writes {
		args = append(args, "-c", w)
	}
	runTool(t, "qemu-io", append(args, path)...)
	return path
}

// patterned is n bytes that differ with seed.
func patterned(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed ^ byte(i*7+i/4096)
	}
	return b
}
