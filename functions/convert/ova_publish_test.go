package convert

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/objstore"
)

// ovaJob is a job of an OVA whose disks are converted and verified in
// scratch, ready to publish.
func ovaJob(t *testing.T, h *Handler, n int) (j *job, disks []disk) {
	t.Helper()
	j = h.newJob(events.ConvertJob{JobID: "j1", Bucket: "uploads", Key: "apps/web.ova"}, 1, 4)
	j.outFormat, j.dir = "raw", t.TempDir()
	for i := range n {
		name := string(rune('a'+i)) + ".vmdk"
		out := filepath.Join(j.dir, name+".raw")
		body := bytes.Repeat([]byte{byte(i + 1)}, 4096)
		if err := os.WriteFile(out, body, 0o600); err != nil {
			t.Fatal(err)
		}
		disks = append(disks, disk{member: name, output: out, input: out + ".in", outSize: int64(len(body)),
			outKey: events.OVADiskKey("", j.Key, name, "raw")})
	}
	return j, disks
}

func TestOVAWhoseLastDiskFailsToUploadPublishesNoDisk(t *testing.T) {
	var mu sync.Mutex
	started := map[string]bool{}
	store := &fakeStore{UploadFn: func(_ context.Context, _, k string, f objstore.File, _ map[string]string, _ io.Reader) (objstore.Object, error) {
		mu.Lock()
		started[k] = true
		mu.Unlock()
		if strings.Contains(k, "/c.vmdk") {
			return objstore.Object{}, errors.New("connection reset by peer")
		}
		return objstore.Object{Size: f.Size()}, nil
	}}
	h := newTestHandler(t, store, &fakeReporter{})
	j, disks := ovaJob(t, h, 3)

	_, err := h.publishOVA(context.Background(), j, h.track(j, "ova"), disks)
	if err == nil || !strings.Contains(err.Error(), "connection reset") {
		t.Fatalf("publishOVA = %v, want the failing disk's own error", err)
	}
	if len(started) != 3 {
		t.Errorf("uploads started for %v, want all three disks", started)
	}
	if len(store.written) != 0 {
		t.Errorf("disks published although one failed: %v", store.written)
	}
}

func TestOVAWithEveryDiskUploadedPublishesEveryDisk(t *testing.T) {
	store := &fakeStore{UploadFn: func(_ context.Context, _, _ string, f objstore.File, _ map[string]string, _ io.Reader) (objstore.Object, error) {
		return objstore.Object{Size: f.Size()}, nil
	}, SetTagsFn: func(context.Context, string, string, string, map[string]string) error { return nil }}
	h := newTestHandler(t, store, &fakeReporter{})
	j, disks := ovaJob(t, h, 3)

	disks, err := h.publishOVA(context.Background(), j, h.track(j, "ova"), disks)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range disks {
		if _, ok := store.written["images/"+d.outKey]; !ok {
			t.Errorf("%s not published", d.outKey)
		}
		if d.sha256 == "" {
			t.Errorf("%s has no sha256", d.outKey)
		}
	}
}
