package bench

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/inspect"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
	"github.com/imagepipe/imagepipe/test/stack"
)

// Fixture is one file the micro-benchmarks inspect.
type Fixture struct {
	Kind string
	Data []byte
}

// InspectFixtures builds one small image of each kind of upload with
// qemu-img in dir.
func InspectFixtures(ctx context.Context, dir string) ([]Fixture, error) {
	var out []Fixture
	for i, kind := range stack.MixedKinds {
		if kind == stack.KindQcow2Gzip {
			continue // convert decompresses before inspecting
		}
		img, err := stack.Make(ctx, dir, fmt.Sprintf("micro-%d", i), stack.Spec{Kind: kind, Virtual: 16 << 20, Data: 1 << 20, Seed: uint64(i)}, false)
		if err != nil {
			return nil, err
		}
		data, err := os.ReadFile(img.Path)
		if err != nil {
			return nil, err
		}
		out = append(out, Fixture{Kind: kind, Data: data})
		_ = os.Remove(filepath.Join(dir, filepath.Base(img.Path)))
	}
	return out, nil
}

// Inspect benchmarks the header inspector on one image held in memory.
func Inspect(data []byte) func(*testing.B) {
	return func(b *testing.B) {
		r := bytes.NewReader(data)
		lim := inspect.Limits{MaxVirtualSize: 1 << 41}
		b.ReportAllocs()
		for b.Loop() {
			if _, err := inspect.Inspect(r, int64(len(data)), lim); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// Notification is a real MinIO notification of a multipart upload.
const Notification = `{"EventName":"s3:ObjectCreated:CompleteMultipartUpload","Key":"uploads/incoming/win11.vhdx",
 "Records":[{"eventVersion":"2.0","eventSource":"minio:s3","eventTime":"2026-11-23T07:45:27.775Z",
 "eventName":"s3:ObjectCreated:CompleteMultipartUpload",
 "s3":{"bucket":{"name":"uploads"},"object":{"key":"incoming%2Fwin11.vhdx","size":25165824,
 "eTag":"8b945bef478408cf6744e493a0454030-2","contentType":"application/octet-stream","sequencer":"18EA9CE969A00B93"}}}]}`

// ParseNotification benchmarks decoding one MinIO notification.
func ParseNotification(b *testing.B) {
	payload := []byte(Notification)
	b.SetBytes(int64(len(payload)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := events.ParseNotification(payload); err != nil {
			b.Fatal(err)
		}
	}
}

// ParseProgress benchmarks reading one qemu-img progress line.
func ParseProgress(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := qemuimg.ParseProgress("    (42.17/100%)"); !ok {
			b.Fatal("progress line refused")
		}
	}
}
