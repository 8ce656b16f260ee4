package convert

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
)

// measuringQemu counts the disks it measures.
type measuringQemu struct {
	QemuImg
	measured atomic.Int32
}

func (q *measuringQemu) Measure(ctx context.Context, path, format string) (int64, error) {
	q.measured.Add(1)
	return q.QemuImg.Measure(ctx, path, format)
}

// A disk's output needs room for its data, not for its virtual size: on a
// scratch disk of 48 MiB with 24 MiB free, a thin 96 MiB disk converts,
// one whose data does not fit what is free waits for other jobs, and one
// whose data is more than the whole disk is refused at once by rule, since
// waiting would only spend its attempts; a VHDX, whose allocation
// qemu-img cannot see, alike. A disk that fits what is free whole is not
// measured: the check costs the common job nothing.
func TestScratchSpaceIsJudgedByTheDisksDataNotItsVirtualSize(t *testing.T) {
	const free, total = 24 << 20, 48 << 20
	for _, tc := range []struct {
		name     string
		format   string
		virtual  string
		dataMiB  int
		measured bool
		want     string
	}{
		{"fits what is free whole", "qcow2", "16M", 1, false, "converted"},
		{"larger than the disk, its data fits", "qcow2", "96M", 1, true, "converted"},
		{"data more than is free", "qcow2", "96M", 32, true, "retried"},
		{"data more than the whole disk", "qcow2", "96M", 56, true, "refused"},
		// qemu-img sees no allocation in a VHDX: its block table counts.
		{"VHDX larger than the disk, its data fits", "vhdx", "96M", 1, true, "converted"},
		{"VHDX data more than the whole disk", "vhdx", "96M", 56, true, "refused"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			key := "thin." + tc.format
			img, ref := filepath.Join(dir, key), filepath.Join(dir, "ref.raw")
			opts := "cluster_size=64k"
			if tc.format == "vhdx" {
				opts = "block_size=1M"
			}
			run(t, "qemu-img", "create", "-q", "-f", tc.format, "-o", opts, img, tc.virtual)
			run(t, "qemu-io", "-f", tc.format, "-c", "write -P 0x5a 0 "+strconv.Itoa(tc.dataMiB)+"M", img)
			run(t, "qemu-img", "convert", "-f", tc.format, "-O", "raw", img, ref)
			body, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			store, _ := memStore(key, body, nil)
			h := newTestHandler(t, store, &fakeReporter{})
			q := &measuringQemu{QemuImg: h.qemu}
			h.qemu = q
			h.diskSpace = func(string) (int64, int64, error) { return free, total, nil }

			out, err := h.Handle(context.Background(), events.ConvertJob{JobID: "j", Bucket: "uploads", Key: key, ETag: "e1", Size: int64(len(body))}, 1, 4)
			if got := q.measured.Load() > 0; got != tc.measured {
				t.Errorf("measured %v, want %v", got, tc.measured)
			}
			switch tc.want {
			case "converted":
				if err != nil {
					t.Fatal(err)
				}
				var c events.Converted
				if err := out[0].Event.DecodeData(events.TypeConverted, &c); err != nil {
					t.Fatal(err)
				}
				if want := fileSHA256(t, ref); c.SHA256 != want {
					t.Errorf("output sha256 %s, want qemu-img's %s", c.SHA256, want)
				}
			case "retried":
				if err == nil || failure.IsPermanent(err) || !strings.Contains(err.Error(), "scratch space too small") {
					t.Fatalf("err = %v, want a retryable shortage of scratch space", err)
				}
			case "refused":
				if !failure.IsPermanent(err) {
					t.Fatalf("err = %v, want a permanent refusal", err)
				}
				var f events.Failed
				if err := out[0].Event.DecodeData(events.TypeFailed, &f); err != nil {
					t.Fatal(err)
				}
				if f.Rule != events.RuleScratchSpace || f.WillRetry || f.Phase != events.PhaseInspect || f.Suggestion == "" {
					t.Errorf("failed = %+v, want rule %s in %s, not retried, with a suggestion", f, events.RuleScratchSpace, events.PhaseInspect)
				}
			}
		})
	}
}
