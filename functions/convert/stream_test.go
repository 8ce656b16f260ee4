package convert

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/scratch"
)

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// vhdxWithScatteredData is a 64 MiB VHDX with data at its start, middle
// and end, and the sha256 of its raw conversion by qemu-img alone.
func vhdxWithScatteredData(t *testing.T) (body []byte, rawSHA256 string) {
	t.Helper()
	dir := t.TempDir()
	img, ref := filepath.Join(dir, "in.vhdx"), filepath.Join(dir, "ref.raw")
	run(t, "qemu-img", "create", "-q", "-f", "vhdx", img, "64M")
	run(t, "qemu-io", "-f", "vhdx", "-c", "write -P 0xab 0 3M", "-c", "write -P 0xcd 20M 1M",
		"-c", "write -P 0xef 33M 512", "-c", "write -P 0x17 63M 1M", img)
	run(t, "qemu-img", "convert", "-f", "vhdx", "-O", "raw", img, ref)
	return readFile(t, img), fileSHA256(t, ref)
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func fileSHA256(t *testing.T, path string) string {
	t.Helper()
	sum := sha256.Sum256(readFile(t, path))
	return hex.EncodeToString(sum[:])
}

func newStreamingHandler(t *testing.T, store Storage, rep *fakeReporter) *Handler {
	t.Helper()
	h := newTestHandler(t, store, rep)
	h.cfg.StreamOutput = true
	h.streamAbove = 0 // these test images are smaller than one part
	return h
}

// readGrowing reads a growing upload the way the store does: each part
// once it is final.
func readGrowing(ctx context.Context, src objstore.Growing, size int64) (string, error) {
	const part = 5 << 20 // several parts of the test images
	hsh := sha256.New()
	for off := int64(0); off < size; off += part {
		n := min(part, size-off)
		if err := src.Wait(ctx, off+n); err != nil {
			return "", err
		}
		if _, err := io.Copy(hsh, io.NewSectionReader(src, off, n)); err != nil {
			return "", err
		}
	}
	return hex.EncodeToString(hsh.Sum(nil)), nil
}

func TestRawOutputIsUploadedWhileQemuImgWritesItAndMatchesQemuImgAlone(t *testing.T) {
	body, want := vhdxWithScatteredData(t)
	store, calls := memStore("disks/web.vhdx", body, nil)
	store.UploadFn = func(context.Context, string, string, objstore.File, map[string]string, io.Reader) (objstore.Object, error) {
		t.Error("the output was uploaded after conversion, not while it converted")
		return objstore.Object{}, errors.New("not this way")
	}
	var uploaded string
	store.GrowingFn = func(ctx context.Context, bucket, key string, src objstore.Growing, size int64, _ map[string]string, progress io.Reader) (objstore.Object, error) {
		if bucket != "images" || key != "disks/web.vhdx.raw" || size != 64<<20 {
			t.Errorf("upload of %s/%s, %d bytes", bucket, key, size)
		}
		sum, err := readGrowing(ctx, src, size)
		uploaded = sum
		return objstore.Object{Bucket: bucket, Key: key, Size: size, VersionID: "v1"}, err
	}
	h := newStreamingHandler(t, store, &fakeReporter{})
	out, err := h.Handle(context.Background(), events.ConvertJob{JobID: "j1", Bucket: "uploads", Key: "disks/web.vhdx"}, 1, 4)
	if err != nil {
		t.Fatal(err)
	}
	if uploaded != want {
		t.Fatalf("uploaded bytes hash to %s, qemu-img alone gives %s", uploaded, want)
	}
	var conv events.Converted
	if len(out) != 1 || out[0].Subject != events.SubjectConverted || out[0].Event.DecodeData(events.TypeConverted, &conv) != nil {
		t.Fatalf("result %+v", out)
	}
	if conv.SHA256 != want || conv.OutputSize != 64<<20 || conv.VirtualSize != 64<<20 {
		t.Fatalf("converted event %+v, want sha256 %s and 64 MiB", conv, want)
	}
	if !contains(*calls, "tag images/disks/web.vhdx.raw") {
		t.Fatalf("hash never tagged: %v", *calls)
	}
	if entries, _ := os.ReadDir(h.cfg.ScratchDir); len(entries) != 0 {
		t.Fatalf("scratch holds %v after the job", entries)
	}
}

// qcow2FailingMidConvert passes inspection and qemu-img info but has its
// compressed clusters past 384 KiB overwritten, so convert fails after it
// has written the first ones.
func qcow2FailingMidConvert(t *testing.T) []byte {
	t.Helper()
	dir := t.TempDir()
	raw, img := filepath.Join(dir, "in.raw"), filepath.Join(dir, "in.qcow2")
	r := rand.New(rand.NewPCG(1, 2))
	b := make([]byte, 4<<20)
	for i := range b {
		if i%3 == 0 {
			b[i] = byte(r.IntN(256))
		} else {
			b[i] = byte(i / 1000 % 251)
		}
	}
	if err := os.WriteFile(raw, b, 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", raw, img)
	body := readFile(t, img)
	for i := 0x60000; i < len(body); i++ {
		body[i] = 0xff
	}
	return body
}

func TestQemuImgFailingMidStreamLeavesNoOutputAndNamesTheImage(t *testing.T) {
	store, _ := memStore("disks/db.qcow2", qcow2FailingMidConvert(t), nil)
	var waitErr error
	store.GrowingFn = func(ctx context.Context, bucket, key string, src objstore.Growing, size int64, _ map[string]string, _ io.Reader) (objstore.Object, error) {
		_, waitErr = readGrowing(ctx, src, size)
		return objstore.Object{}, waitErr
	}
	h := newStreamingHandler(t, store, &fakeReporter{})
	out, err := h.Handle(context.Background(), events.ConvertJob{JobID: "j2", Bucket: "uploads", Key: "disks/db.qcow2"}, 1, 4)
	if err == nil {
		t.Fatal("a qcow2 whose clusters are damaged converted")
	}
	if waitErr == nil {
		t.Fatal("the upload finished although qemu-img failed")
	}
	var failed events.Failed
	if len(out) != 1 || out[0].Event.DecodeData(events.TypeFailed, &failed) != nil {
		t.Fatalf("result %+v", out)
	}
	if failed.Phase != events.PhaseConvert || failed.WillRetry || !strings.Contains(failed.Message, "qemu-img cannot read this qcow2 image") {
		t.Fatalf("failure %+v, want a permanent convert failure naming the image", failed)
	}
	if entries, _ := os.ReadDir(h.cfg.ScratchDir); len(entries) != 0 {
		t.Fatalf("scratch holds %v after the job", entries)
	}
}

func TestStreamedUploadFailureStopsTheConversionAndIsClassifiedAsAnUploadFailure(t *testing.T) {
	body, _ := vhdxWithScatteredData(t)
	for _, tc := range []struct {
		name      string
		err       error
		willRetry bool
	}{
		{"connection reset", errors.New("connection reset by peer"), true},
		{"access denied", minio.ErrorResponse{Code: "AccessDenied", StatusCode: 403, Message: "Access Denied."}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store, _ := memStore("disks/web.vhdx", body, nil)
			store.GrowingFn = func(context.Context, string, string, objstore.Growing, int64, map[string]string, io.Reader) (objstore.Object, error) {
				return objstore.Object{}, tc.err
			}
			h := newStreamingHandler(t, store, &fakeReporter{})
			// A conversion that runs until stopped, or until its limit.
			qemu := &endlessConvert{QemuImg: h.qemu}
			h.qemu = qemu
			h.cfg.ConvertTimeoutBase, h.cfg.ConvertTimeoutPerGiB = 5*time.Second, 0
			out, err := h.Handle(context.Background(), events.ConvertJob{JobID: "j3", Bucket: "uploads", Key: "disks/web.vhdx"}, 1, 4)
			var failed events.Failed
			if err == nil || len(out) != 1 || out[0].Event.DecodeData(events.TypeFailed, &failed) != nil {
				t.Fatalf("Handle = %v, %+v", err, out)
			}
			if failed.Phase != events.PhaseUpload || failed.WillRetry != tc.willRetry || !strings.Contains(failed.Message, tc.err.Error()) {
				t.Fatalf("failure %+v, want an upload failure saying %q, will retry %v", failed, tc.err, tc.willRetry)
			}
			if qemu.ended != context.Canceled {
				t.Fatalf("the conversion ended with %v, want it stopped once the upload failed", qemu.ended)
			}
			if entries, _ := os.ReadDir(h.cfg.ScratchDir); len(entries) != 0 {
				t.Fatalf("scratch holds %v after the job", entries)
			}
		})
	}
}

// endlessConvert is qemu-img whose conversion to NBD runs until its
// context ends, and says how it ended.
type endlessConvert struct {
	QemuImg
	ended error
}

func (e *endlessConvert) ConvertToNBD(ctx context.Context, _, _, _ string, _ func(float64)) error {
	<-ctx.Done()
	e.ended = ctx.Err()
	return ctx.Err()
}

func TestRawOutputIsUploadedAfterConversionWhereStreamingCannotHelp(t *testing.T) {
	body, want := vhdxWithScatteredData(t)
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T, h *Handler)
	}{
		{"one part only", func(t *testing.T, h *Handler) { h.streamAbove = 64 << 20 }},
		{"no socket path fits", func(t *testing.T, h *Handler) {
			long := filepath.Join(t.TempDir(), strings.Repeat("d", 100))
			if err := os.MkdirAll(long, 0o700); err != nil {
				t.Fatal(err)
			}
			t.Setenv("TMPDIR", long)
			h.cfg.ScratchDir = long
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store, calls := memStore("disks/web.vhdx", body, nil)
			store.GrowingFn = func(context.Context, string, string, objstore.Growing, int64, map[string]string, io.Reader) (objstore.Object, error) {
				t.Error("streamed")
				return objstore.Object{}, errors.New("not this way")
			}
			uploaded := hashUploads(store)
			h := newStreamingHandler(t, store, &fakeReporter{})
			tc.setup(t, h)
			if _, err := h.Handle(context.Background(), events.ConvertJob{JobID: "j4", Bucket: "uploads", Key: "disks/web.vhdx"}, 1, 4); err != nil {
				t.Fatal(err)
			}
			if *uploaded != want || !contains(*calls, "tag images/disks/web.vhdx.raw") {
				t.Fatalf("uploaded %s (calls %v), want %s", *uploaded, *calls, want)
			}
		})
	}
}

// hashUploads makes store hash what it is given to upload after
// conversion; the hash is read through the returned pointer.
func hashUploads(store *fakeStore) *string {
	var uploaded string
	store.UploadFn = func(ctx context.Context, bucket, key string, f objstore.File, _ map[string]string, _ io.Reader) (objstore.Object, error) {
		sum, err := readGrowing(ctx, finalFile{f}, f.Size())
		uploaded = sum
		return objstore.Object{Bucket: bucket, Key: key, Size: f.Size()}, err
	}
	return &uploaded
}

// finalFile is a complete file seen as a growing one.
type finalFile struct{ objstore.File }

func (finalFile) Wait(context.Context, int64) error { return nil }

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// outOfOrderConvert stands in for a qemu-img that breaks the write order:
// real qemu-io writes its output into the export, the second write below
// the first.
type outOfOrderConvert struct{ QemuImg }

func (outOfOrderConvert) ConvertToNBD(ctx context.Context, _, _, socket string, _ func(float64)) error {
	out, err := exec.CommandContext(ctx, "qemu-io", "--image-opts",
		"-c", "write -P 0x5a 2M 1M", "-c", "write -P 0xa5 0 64k",
		"driver=raw,file.driver=nbd,file.server.type=unix,file.server.path="+socket).CombinedOutput()
	if err != nil {
		return fmt.Errorf("qemu-io: %v: %s", err, out)
	}
	return nil
}

func TestOutputWrittenOutOfOrderIsUploadedWholeOnceConverted(t *testing.T) {
	body, _ := vhdxWithScatteredData(t)
	want := make([]byte, 64<<20)
	for i := range 1 << 20 {
		want[2<<20+i] = 0x5a
	}
	for i := range 64 << 10 {
		want[i] = 0xa5
	}
	wantSum := sha256.Sum256(want)
	store, calls := memStore("disks/web.vhdx", body, nil)
	var streamErr error
	store.GrowingFn = func(ctx context.Context, _, _ string, src objstore.Growing, size int64, _ map[string]string, _ io.Reader) (objstore.Object, error) {
		_, streamErr = readGrowing(ctx, src, size)
		return objstore.Object{}, streamErr
	}
	uploaded := hashUploads(store)
	h := newStreamingHandler(t, store, &fakeReporter{})
	h.qemu = outOfOrderConvert{h.qemu}
	out, err := h.Handle(context.Background(), events.ConvertJob{JobID: "j5", Bucket: "uploads", Key: "disks/web.vhdx"}, 1, 4)
	if err != nil {
		t.Fatal(err)
	}
	if !errors.Is(streamErr, scratch.ErrOutOfOrder) {
		t.Fatalf("the streamed upload ended with %v, want ErrOutOfOrder", streamErr)
	}
	if *uploaded != hex.EncodeToString(wantSum[:]) {
		t.Fatalf("uploaded %s, want the writes in the order made, %x", *uploaded, wantSum)
	}
	var conv events.Converted
	if len(out) != 1 || out[0].Event.DecodeData(events.TypeConverted, &conv) != nil || conv.SHA256 != *uploaded {
		t.Fatalf("result %+v, want converted with sha256 %s", out, *uploaded)
	}
	if !contains(*calls, "tag images/disks/web.vhdx.raw") {
		t.Fatalf("hash never tagged: %v", *calls)
	}
}

// A newer version of the input is uploaded while the older one converts:
// the older job's output write is vetoed just before it completes, and the
// job ends quietly, as one superseded at download does, leaving nothing
// tagged and nothing to publish.
func TestStreamedOutputOfAnInputOverwrittenMeanwhileIsNeitherWrittenNorTagged(t *testing.T) {
	body, _ := vhdxWithScatteredData(t)
	store, calls := memStore("disks/web.vhdx", body, nil)
	overwritten := false
	inputStat := store.StatFn
	store.StatFn = func(ctx context.Context, b, k string) (objstore.Object, error) {
		obj, err := inputStat(ctx, b, k)
		if overwritten {
			obj.ETag = "e2"
		}
		return obj, err
	}
	store.GrowingFn = func(ctx context.Context, bucket, key string, src objstore.Growing, size int64, _ map[string]string, _ io.Reader) (objstore.Object, error) {
		_, err := readGrowing(ctx, src, size)
		overwritten = true // the newer version lands before the write completes
		return objstore.Object{Bucket: bucket, Key: key, Size: size}, err
	}
	rep := &fakeReporter{}
	h := newStreamingHandler(t, store, rep)
	out, err := h.Handle(context.Background(), events.ConvertJob{JobID: "j1", Bucket: "uploads", Key: "disks/web.vhdx", ETag: "e1"}, 1, 4)
	if err != nil || len(out) != 0 {
		t.Fatalf("Handle returned %d events and error %v; want a quiet end", len(out), err)
	}
	if _, err := store.Stat(context.Background(), "images", "disks/web.vhdx.raw"); err == nil {
		t.Fatal("the output of the older version was written")
	}
	for _, c := range *calls {
		if strings.HasPrefix(c, "tag ") {
			t.Fatalf("a superseded output was tagged: %v", *calls)
		}
	}
	for _, st := range rep.states {
		if st.State == events.StateReady || st.State == events.StateFailed {
			t.Fatalf("a superseded job recorded %s", st.State)
		}
	}
}

// Another job writes the same output key between this job's write and its
// tag: the tag, which marks an output complete, must not go on the other
// job's object.
func TestOutputReplacedBeforeItIsTaggedIsLeftToItsWriter(t *testing.T) {
	body, _ := vhdxWithScatteredData(t)
	store, calls := memStore("disks/web.vhdx", body, nil)
	const outKey = "images/disks/web.vhdx.raw"
	written := false
	inputStat := store.StatFn
	store.StatFn = func(ctx context.Context, b, k string) (objstore.Object, error) {
		store.mu.Lock()
		if _, ok := store.written[outKey]; ok && !written {
			// Once this job's output is in place, another job's replaces it.
			written = true
			store.written[outKey] = objstore.Object{Bucket: "images", Key: "disks/web.vhdx.raw", ETag: "other",
				Metadata: map[string]string{events.MetaJob: "j-other"}}
		}
		store.mu.Unlock()
		return inputStat(ctx, b, k)
	}
	store.GrowingFn = func(ctx context.Context, bucket, key string, src objstore.Growing, size int64, _ map[string]string, _ io.Reader) (objstore.Object, error) {
		_, err := readGrowing(ctx, src, size)
		return objstore.Object{Bucket: bucket, Key: key, Size: size}, err
	}
	h := newStreamingHandler(t, store, &fakeReporter{})
	out, err := h.Handle(context.Background(), events.ConvertJob{JobID: "j1", Bucket: "uploads", Key: "disks/web.vhdx", ETag: "e1"}, 1, 4)
	if err != nil || len(out) != 0 {
		t.Fatalf("Handle returned %d events and error %v; want a quiet end", len(out), err)
	}
	if !written {
		t.Fatal("the output was never replaced: the test did not run as meant")
	}
	for _, c := range *calls {
		if strings.HasPrefix(c, "tag ") {
			t.Fatalf("another job's output was tagged: %v", *calls)
		}
	}
}
