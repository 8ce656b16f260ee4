package ingest

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
)

// fakeStatus records queued jobs.
type fakeStatus struct {
	QueueFn func(ctx context.Context, st events.Status) error
}

func (f *fakeStatus) Queue(ctx context.Context, st events.Status) error { return f.QueueFn(ctx, st) }

var _ StatusWriter = (*fakeStatus)(nil)

func notification(event, bucket, wireKey string, size int64, meta string) []byte {
	if meta == "" {
		meta = "{}"
	}
	return fmt.Appendf(nil, `{"EventName":%q,"Records":[{"eventName":%q,"eventTime":"2026-11-23T07:45:27.775Z",
"s3":{"bucket":{"name":%q},"object":{"key":%q,"size":%d,"eTag":"e1","versionId":"","userMetadata":%s}}}]}`,
		event, event, bucket, wireKey, size, meta)
}

func newTestHandler(queued *[]events.Status) *Handler {
	h := New(Config{InputBucket: "uploads", OutputBucket: "images"}, &fakeStatus{QueueFn: func(_ context.Context, st events.Status) error {
		*queued = append(*queued, st)
		return nil
	}}, slog.New(slog.DiscardHandler))
	h.now = func() time.Time { return time.Date(2026, 11, 23, 8, 0, 0, 0, time.UTC) }
	return h
}

func TestIngestQueuesOneJobPerUploadWithTheDecodedKey(t *testing.T) {
	for _, event := range []string{"s3:ObjectCreated:Put", "s3:ObjectCreated:Post", "s3:ObjectCreated:Copy", "s3:ObjectCreated:CompleteMultipartUpload"} {
		t.Run(event, func(t *testing.T) {
			var queued []events.Status
			h := newTestHandler(&queued)
			out, err := h.Handle(context.Background(), notification(event, "uploads", "disks%2Fwin+11.vhdx", 100, ""))
			if err != nil {
				t.Fatal(err)
			}
			if len(out) != 1 || out[0].Subject != events.SubjectConvertJob {
				t.Fatalf("messages = %+v, want one job", out)
			}
			var job events.ConvertJob
			if err := out[0].Event.DecodeData(events.TypeConvertJob, &job); err != nil {
				t.Fatal(err)
			}
			if job.Bucket != "uploads" || job.Key != "disks/win 11.vhdx" || job.Size != 100 || job.ETag != "e1" {
				t.Errorf("job = %+v", job)
			}
			identity := events.ObjectIdentity("uploads", "disks/win 11.vhdx", "", "e1")
			if out[0].Event.ID != identity || job.JobID != events.JobIDFor(identity) {
				t.Errorf("event id %s job id %s are not derived from the object identity", out[0].Event.ID, job.JobID)
			}
			if out[0].Event.Subject != "disks/win 11.vhdx" {
				t.Errorf("event subject %q, want the input key", out[0].Event.Subject)
			}
			if len(queued) != 1 || queued[0].JobID != job.JobID {
				t.Errorf("status queued = %+v", queued)
			}
		})
	}
}

func TestIngestSkipsWhatIsNotANewUpload(t *testing.T) {
	tests := []struct {
		name string
		data []byte
	}{
		{"tagging", notification("s3:ObjectCreated:PutTagging", "uploads", "a.vhdx", 10, "")},
		{"retention", notification("s3:ObjectCreated:PutRetention", "uploads", "a.vhdx", 10, "")},
		{"delete", notification("s3:ObjectRemoved:Delete", "uploads", "a.vhdx", 10, "")},
		{"other bucket", notification("s3:ObjectCreated:Put", "images", "a.vhdx.raw", 10, "")},
		{"folder marker", notification("s3:ObjectCreated:Put", "uploads", "disks%2F", 0, "")},
		{"empty object", notification("s3:ObjectCreated:Put", "uploads", "a.vhdx", 0, "")},
		{"error report", notification("s3:ObjectCreated:Put", "uploads", "errors%2Fa.vhdx.error.json", 10, "")},
		{"marked output", notification("s3:ObjectCreated:Put", "uploads", "a.vhdx.raw", 10, `{"X-Amz-Meta-Imagepipe-Output":"true"}`)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var queued []events.Status
			out, err := newTestHandler(&queued).Handle(context.Background(), tt.data)
			if err != nil || len(out) != 0 || len(queued) != 0 {
				t.Errorf("Handle = %d messages, %d queued, err %v; want nothing", len(out), len(queued), err)
			}
		})
	}
}

func TestIngestRefusesMalformedNotificationsForGood(t *testing.T) {
	var queued []events.Status
	_, err := newTestHandler(&queued).Handle(context.Background(), []byte(`{"Records":[`))
	if !failure.IsPermanent(err) {
		t.Errorf("err = %v, want a permanent failure", err)
	}
}

func FuzzIngestHandle(f *testing.F) {
	f.Add(notification("s3:ObjectCreated:Put", "uploads", "a%2Fb.vhdx", 10, ""))
	f.Add([]byte(`{"Records":[{}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var queued []events.Status
		out, err := newTestHandler(&queued).Handle(context.Background(), b)
		if err == nil && len(out) != len(queued) {
			t.Fatalf("%d jobs but %d status records", len(out), len(queued))
		}
	})
}
