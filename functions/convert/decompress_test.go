package convert

import (
	"bytes"
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/decompress/decompresstest"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
)

// zstdFrameDeclaringWindow is a valid zstd frame whose header asks for a
// window of 2^n bytes and whose one raw block holds a few bytes: encoders
// shrink the window to fit small inputs, so a hostile header is written
// by hand (RFC 8878, section 3.1.1).
func zstdFrameDeclaringWindow(window uint64) []byte {
	log := 0
	for uint64(1)<<log < window {
		log++
	}
	frame := []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, byte(log-10) << 3}
	block := []byte("imagepipe")
	size := len(block)<<3 | 1 // last block, raw
	frame = append(frame, byte(size), byte(size>>8), byte(size>>16))
	return append(frame, block...)
}

func TestCompressedUploadDeclaringAHugeWindowIsRefusedByRule(t *testing.T) {
	data := bytes.Repeat([]byte("imagepipe"), 1000)
	for key, body := range map[string][]byte{
		"big-dict.qcow2.xz":    decompresstest.Compressed(t, data, decompresstest.XZWithDict(1<<30)),
		"big-window.qcow2.zst": zstdFrameDeclaringWindow(256 << 20),
	} {
		t.Run(key, func(t *testing.T) {
			store, calls := memStore(key, body, nil)
			rep := &fakeReporter{}
			h := newTestHandler(t, store, rep)
			out, err := h.Handle(context.Background(), events.ConvertJob{JobID: "j", Bucket: "uploads", Key: key, ETag: "e1", Size: int64(len(body))}, 1, 4)
			if !failure.IsPermanent(err) {
				t.Fatalf("err = %v, want a permanent refusal", err)
			}
			var f events.Failed
			if err := out[0].Event.DecodeData(events.TypeFailed, &f); err != nil {
				t.Fatal(err)
			}
			if f.Rule != "decompress-window" || f.Phase != events.PhaseDownload || f.WillRetry || f.Suggestion == "" {
				t.Errorf("failed = %+v, want rule decompress-window in download, not retried, with a suggestion", f)
			}
			for _, c := range *calls {
				if len(c) > 7 && c[:7] == "upload " {
					t.Errorf("an output was uploaded: %v", *calls)
				}
			}
		})
	}
}

func TestCompressedUploadPastItsBudgetIsRefusedByRuleNotRetried(t *testing.T) {
	for _, tc := range []struct {
		name, rule string
		body       []byte
		cfg        func(*Config)
	}{
		// 256 MiB of zeros cost no scratch space, but are more content
		// than the limit allows.
		{"zeros past the virtual size limit", "virtual-size", decompresstest.ZstdRun(0, 256<<20), func(c *Config) { c.MaxVirtualSize = 64 << 20 }},
		// Data is written, and there is no room for it beyond the reserve.
		{"data past the scratch space", "scratch-space", decompresstest.ZstdRun(0x5a, 64<<20), func(c *Config) { c.ScratchReserve = 1 << 62 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const key = "bomb.img.zst"
			store, calls := memStore(key, tc.body, nil)
			cfg := Config{OutputBucket: "images", OutputFormat: "raw", ScratchDir: t.TempDir(), MaxVirtualSize: 1 << 40,
				ConvertTimeoutBase: time.Minute, ConvertTimeoutPerGiB: time.Minute}
			tc.cfg(&cfg)
			h := New(cfg, store, qemuimg.New(nil), &fakeReporter{}, nil, slog.New(slog.DiscardHandler))
			out, err := h.Handle(context.Background(), events.ConvertJob{JobID: "j", Bucket: "uploads", Key: key, ETag: "e1", Size: int64(len(tc.body))}, 1, 4)
			if !failure.IsPermanent(err) {
				t.Fatalf("err = %v, want a permanent refusal", err)
			}
			var f events.Failed
			if err := out[0].Event.DecodeData(events.TypeFailed, &f); err != nil {
				t.Fatal(err)
			}
			if f.Rule != tc.rule || f.Phase != events.PhaseDownload || f.WillRetry || f.Suggestion == "" {
				t.Errorf("failed = %+v, want rule %s in download, not retried, with a suggestion", f, tc.rule)
			}
			for _, c := range *calls {
				if len(c) > 7 && c[:7] == "upload " {
					t.Errorf("an output was uploaded: %v", *calls)
				}
			}
		})
	}
}
