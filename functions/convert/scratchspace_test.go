package convert

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/scratch"
)

// An image whose virtual size is more than the whole scratch file system
// can never be converted there: waiting for other jobs to free space
// would only spend its attempts, so it is refused at once by rule.
func TestImageLargerThanTheWholeScratchFileSystemIsRefusedNotRetried(t *testing.T) {
	dir := t.TempDir() // the scratch dir's file system too
	_, total, err := scratch.DiskSpace(dir)
	if err != nil {
		t.Fatal(err)
	}
	vsize := (total/512 + 1<<21) * 512 // 1 GiB more, in whole sectors
	img := filepath.Join(dir, "big.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, strconv.FormatInt(vsize, 10))
	body, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	store, _ := memStore("big.qcow2", body, nil)
	rep := &fakeReporter{}
	h := newTestHandler(t, store, rep)
	h.cfg.MaxVirtualSize = 2 * vsize

	out, err := h.Handle(context.Background(), events.ConvertJob{JobID: "j", Bucket: "uploads", Key: "big.qcow2", ETag: "e1", Size: int64(len(body))}, 1, 4)
	if !failure.IsPermanent(err) {
		t.Fatalf("err = %v, want a permanent refusal", err)
	}
	var f events.Failed
	if err := out[0].Event.DecodeData(events.TypeFailed, &f); err != nil {
		t.Fatal(err)
	}
	if f.Rule != events.RuleScratchSpace || f.WillRetry || f.Phase != events.PhaseInspect {
		t.Errorf("failed = %+v, want rule %s in %s, not retried", f, events.RuleScratchSpace, events.PhaseInspect)
	}
}
