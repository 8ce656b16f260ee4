package ingest

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/objstore"
)

func notification(event, bucket, wireKey string, size int64, meta string) []byte {
	if meta == "" {
		meta = "{}"
	}
	return fmt.Appendf(nil, `{"EventName":%q,"Records":[{"eventName":%q,"eventTime":"2026-11-23T07:45:27.775Z",
"s3":{"bucket":{"name":%q},"object":{"key":%q,"size":%d,"eTag":"e1","versionId":"","userMetadata":%s}}}]}`,
		event, event, bucket, wireKey, size, meta)
}

func put(wireKey string, size int64) []byte {
	return notification("s3:ObjectCreated:Put", "uploads", wireKey, size, "")
}

func TestIngestQueuesOneJobPerUploadWithTheDecodedKey(t *testing.T) {
	for _, event := range []string{"s3:ObjectCreated:Put", "s3:ObjectCreated:Post", "s3:ObjectCreated:Copy", "s3:ObjectCreated:CompleteMultipartUpload"} {
		t.Run(event, func(t *testing.T) {
			r := newRig(Config{})
			out, err := r.h.Handle(context.Background(), notification(event, "uploads", "disks%2Fwin+11.vhdx", 100, ""))
			if err != nil {
				t.Fatal(err)
			}
			if len(out) != 1 || out[0].Subject != events.SubjectConvertJob {
				t.Fatalf("messages = %+v, want one job", out)
			}
			job := decodeJob(t, out[0])
			if job.Bucket != "uploads" || job.Key != "disks/win 11.vhdx" || job.Size != 100 || job.ETag != "e1" || job.Reason != "upload" || job.NoDedup {
				t.Errorf("job = %+v", job)
			}
			identity := events.ObjectIdentity("uploads", "disks/win 11.vhdx", "", "e1")
			if out[0].Event.ID != identity || job.JobID != events.JobIDFor(identity) {
				t.Errorf("event id %s job id %s are not derived from the object identity", out[0].Event.ID, job.JobID)
			}
			if out[0].Event.Subject != "disks/win 11.vhdx" {
				t.Errorf("event subject %q, want the input key", out[0].Event.Subject)
			}
			if st, ok := r.status.record("uploads", "disks/win 11.vhdx"); !ok || st.State != events.StateQueued || st.JobID != job.JobID {
				t.Errorf("status = %+v, want QUEUED for the job", st)
			}
			if n := r.h.Stats()[ReasonQueued]; n != 1 {
				t.Errorf("queued count = %d", n)
			}
		})
	}
}

func TestIngestSkipsWhatIsNotANewUpload(t *testing.T) {
	tests := []struct {
		name, reason string
		data         []byte
	}{
		{"tagging", ReasonNotAnUpload, notification("s3:ObjectCreated:PutTagging", "uploads", "a.vhdx", 10, "")},
		{"retention", ReasonNotAnUpload, notification("s3:ObjectCreated:PutRetention", "uploads", "a.vhdx", 10, "")},
		{"legal hold", ReasonNotAnUpload, notification("s3:ObjectCreated:PutLegalHold", "uploads", "a.vhdx", 10, "")},
		{"delete", ReasonNotAnUpload, notification("s3:ObjectRemoved:Delete", "uploads", "a.vhdx", 10, "")},
		{"unknown event", ReasonUnknownEvent, notification("ObjectCreated", "uploads", "a.vhdx", 10, "")},
		{"other bucket", ReasonOtherBucket, notification("s3:ObjectCreated:Put", "images", "a.vhdx.raw", 10, "")},
		{"folder marker", ReasonFolderMarker, put("disks%2F", 0)},
		{"folder marker with bytes", ReasonFolderMarker, put("disks%2F", 10)},
		{"empty object", ReasonEmpty, put("a.vhdx", 0)},
		{"error report", ReasonErrorReport, put("errors%2Fa.vhdx.error.json", 10)},
		{"error report with image extension", ReasonErrorReport, put("errors%2Fa.vhdx", 10)},
		{"marked output", ReasonOutput, notification("s3:ObjectCreated:Put", "uploads", "a.vhdx.raw", 10, `{"X-Amz-Meta-Imagepipe-Output":"true"}`)},
		{"marked output, stat spelling", ReasonOutput, notification("s3:ObjectCreated:Copy", "uploads", "a.raw", 10, `{"imagepipe-output":"true"}`)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newRig(Config{})
			out, err := r.h.Handle(context.Background(), tt.data)
			if err != nil || len(out) != 0 || len(r.status.queued) != 0 {
				t.Errorf("Handle = %d messages, %d queued, err %v; want nothing", len(out), len(r.status.queued), err)
			}
			stats := r.h.Stats()
			if stats[tt.reason] != 1 {
				t.Errorf("stats = %v, want %s counted once", stats, tt.reason)
			}
		})
	}
}

func TestIngestAppliesPrefixAndExtensionRules(t *testing.T) {
	cfg := Config{
		Prefixes:        []string{"incoming/", " vms/ "},
		ExcludePrefixes: []string{"incoming/tmp/"},
		Extensions:      []string{".VHDX", "qcow2", " raw"},
	}
	tests := []struct {
		key  string
		want string
	}{
		{"incoming/a.vhdx", ReasonQueued},
		{"incoming/A.VHDX", ReasonQueued},
		{"vms/b.qcow2", ReasonQueued},
		{"vms/b.Qcow2.XZ", ReasonQueued},
		{"vms/b.raw.zst", ReasonQueued},
		{"vms/b.qcow2.gz", ReasonQueued},
		{"incoming/tmp/a.vhdx", ReasonExcludedPrefix},
		{"other/a.vhdx", ReasonOutsidePrefixes},
		{"a.vhdx", ReasonOutsidePrefixes},
		{"incoming/a.vmdk", ReasonExtension},
		{"incoming/qcow2", ReasonExtension},
		{"incoming/a.qcow2/", ReasonFolderMarker},
		{"errors/incoming/a.vhdx", ReasonErrorReport},
	}
	for _, tt := range tests {
		t.Run(tt.key, func(t *testing.T) {
			r := newRig(cfg)
			if _, err := r.h.Handle(context.Background(), put(strings.ReplaceAll(tt.key, "/", "%2F"), 10)); err != nil {
				t.Fatal(err)
			}
			if got := r.h.Stats()[tt.want]; got != 1 {
				t.Errorf("%s: stats = %v, want %s", tt.key, r.h.Stats(), tt.want)
			}
		})
	}
}

func TestIngestDefaultsAdmitEveryImageFormat(t *testing.T) {
	for _, ext := range []string{"vhdx", "avhdx", "vhd", "vpc", "vmdk", "qcow2", "qcow", "vdi", "img", "raw", "ova", "VHDX", "Qcow2", "vmdk.xz", "img.gz", "raw.zst"} {
		r := newRig(Config{})
		out, err := r.h.Handle(context.Background(), put("d."+ext, 10))
		if err != nil || len(out) != 1 {
			t.Errorf("d.%s: %d messages, err %v; want a job", ext, len(out), err)
		}
	}
	r := newRig(Config{Extensions: []string{"*"}})
	if out, _ := r.h.Handle(context.Background(), put("anything", 10)); len(out) != 1 {
		t.Error(`extension list "*" refused a key without extension`)
	}
}

func TestIngestRefusesObjectsOverTheSizeLimitWithAFailureEvent(t *testing.T) {
	r := newRig(Config{MaxInputSize: 1 << 30})
	out, err := r.h.Handle(context.Background(), put("big%2Fdisk.vhdx", 3<<30))
	if err != nil {
		t.Fatal(err)
	}
	if len(out) != 1 || out[0].Subject != events.SubjectFailed || out[0].Event.Type != events.TypeFailed {
		t.Fatalf("messages = %+v, want one failure event", out)
	}
	f := decodeFailed(t, out[0])
	identity := events.ObjectIdentity("uploads", "big/disk.vhdx", "", "e1")
	if f.Phase != events.PhaseIntake || f.Rule != ReasonTooLarge || f.WillRetry || f.InputKey != "big/disk.vhdx" || f.JobID != events.JobIDFor(identity) {
		t.Errorf("failure = %+v", f)
	}
	for _, want := range []string{"3.0 GiB", "3221225472 bytes", "1.0 GiB", "1073741824 bytes", "IMAGEPIPE_MAX_INPUT_SIZE"} {
		if !strings.Contains(f.Message, want) {
			t.Errorf("message %q lacks %q", f.Message, want)
		}
	}
	if f.Suggestion == "" {
		t.Error("no suggestion")
	}
	st, _ := r.status.record("uploads", "big/disk.vhdx")
	if st.State != events.StateFailed || st.Phase != events.PhaseIntake || st.Message != f.Message || st.Rule != f.Rule {
		t.Errorf("status = %+v, want FAILED with the event's message and rule", st)
	}
	if len(r.status.queued) != 0 {
		t.Error("a refused upload was queued")
	}
	// A repeat makes the same event id: JetStream drops the copy.
	again, _ := r.h.Handle(context.Background(), put("big%2Fdisk.vhdx", 3<<30))
	if len(again) != 1 || again[0].Event.ID != out[0].Event.ID {
		t.Errorf("repeated refusal has event id %v, first %s", again, out[0].Event.ID)
	}
	if r.h.Stats()[ReasonTooLarge] != 2 {
		t.Errorf("stats = %v", r.h.Stats())
	}
}

func TestIngestHandlesUnusualKeysAndRefusesUnsafeOnes(t *testing.T) {
	tests := []struct {
		name, wireKey, key string
		refused            bool
	}{
		{"space", "my+disk.vhdx", "my disk.vhdx", false},
		{"plus", "a%2Bb.vhdx", "a+b.vhdx", false},
		{"unicode", "d%C3%ADsk%2F%E6%97%A5%E6%9C%AC.vmdk", "dísk/日本.vmdk", false},
		{"leading slash", "%2Flead.qcow2", "/lead.qcow2", false},
		{"single dot segment", "a%2F.%2Fb.qcow2", "a/./b.qcow2", false},
		{"dots inside a name", "a..b.qcow2", "a..b.qcow2", false},
		{"dot-dot segment", "a%2F..%2F..%2Fetc%2Fpasswd.raw", "a/../../etc/passwd.raw", true},
		{"dot-dot first", "..%2Fx.raw", "../x.raw", true},
		{"newline", "a%0Ab.qcow2", "a\nb.qcow2", true},
		{"nul", "a%00b.qcow2", "a\x00b.qcow2", true},
		{"escape", "a%1B%5B31mb.qcow2", "a\x1b[31mb.qcow2", true},
		{"delete", "a%7Fb.qcow2", "a\x7fb.qcow2", true},
		{"c1 control", "a%C2%85b.qcow2", "a\u0085b.qcow2", true},
		{"bidi override", "a%E2%80%AEb.qcow2", "a\u202eb.qcow2", true},
		{"invalid utf-8", "a%FFb.qcow2", "a\xffb.qcow2", true},
		{"too long for its output", strings.Repeat("k", 1015) + ".raw", strings.Repeat("k", 1015) + ".raw", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newRig(Config{})
			out, err := r.h.Handle(context.Background(), put(tt.wireKey, 10))
			if err != nil || len(out) != 1 {
				t.Fatalf("Handle = %d messages, err %v", len(out), err)
			}
			if !tt.refused {
				if job := decodeJob(t, out[0]); job.Key != tt.key {
					t.Errorf("job key %q, want %q", job.Key, tt.key)
				}
				return
			}
			f := decodeFailed(t, out[0])
			// JSON cannot carry invalid UTF-8; the event shows U+FFFD.
			if f.Rule != ReasonUnsafeKey || f.Phase != events.PhaseIntake || f.InputKey != strings.ToValidUTF8(tt.key, "\uFFFD") || f.Message == "" || f.Suggestion == "" {
				t.Errorf("failure = %+v", f)
			}
			if st, _ := r.status.record("uploads", tt.key); st.State != events.StateFailed {
				t.Errorf("status = %+v, want FAILED", st)
			}
		})
	}
}

func TestIngestChecksTheMarkerWhenTheOutputBucketIsTheInputBucket(t *testing.T) {
	// A notification that does not say what metadata the object has.
	noMeta := []byte(`{"Records":[{"eventName":"s3:ObjectCreated:Put","s3":{"bucket":{"name":"uploads"},"object":{"key":"a.vhdx.raw","size":10,"eTag":"e1"}}}]}`)
	marked := objstore.Object{Bucket: "uploads", Key: "a.vhdx.raw", Size: 10, ETag: "e1", Metadata: map[string]string{"imagepipe-output": "true"}}

	same := newRig(Config{InputBucket: "uploads", OutputBucket: "uploads"}, marked)
	out, err := same.h.Handle(context.Background(), noMeta)
	if err != nil || len(out) != 0 || same.h.Stats()[ReasonOutput] != 1 {
		t.Errorf("same bucket: %d messages, err %v, stats %v; want the output skipped", len(out), err, same.h.Stats())
	}

	// With separate buckets an output never arrives here: no stat.
	apart := newRig(Config{}, marked)
	if out, _ := apart.h.Handle(context.Background(), noMeta); len(out) != 1 || apart.storage.stats != 0 {
		t.Errorf("separate buckets: %d messages, %d stats", len(out), apart.storage.stats)
	}
	// Nor when the notification carried metadata.
	withMeta := newRig(Config{InputBucket: "uploads", OutputBucket: "uploads"}, marked)
	withMeta.h.Handle(context.Background(), put("a.vhdx.raw", 10))
	if withMeta.storage.stats != 0 {
		t.Error("stat although the notification carried metadata")
	}
}

func TestIngestRetriesWhenTheStatusCannotBeWritten(t *testing.T) {
	r := newRig(Config{})
	r.status.QueueFn = func(context.Context, events.Status) error { return errors.New("kv unavailable") }
	out, err := r.h.Handle(context.Background(), put("a.vhdx", 10))
	if err == nil || failure.IsPermanent(err) || len(out) != 0 {
		t.Errorf("Handle = %d messages, err %v; want a retryable error and no job", len(out), err)
	}
}

func TestIngestRefusesMalformedNotificationsForGoodAndCountsThem(t *testing.T) {
	r := newRig(Config{})
	for _, p := range []string{`{"Records":[`, `not json`, `{"Records":[{"eventName":"s3:ObjectCreated:Put","s3":{"bucket":{"name":"uploads"},"object":{"key":"%zz","size":3}}}]}`} {
		if _, err := r.h.Handle(context.Background(), []byte(p)); !failure.IsPermanent(err) {
			t.Errorf("Handle(%s) err = %v, want a permanent failure", p, err)
		}
	}
	if n := r.h.Stats()[ReasonMalformed]; n != 3 {
		t.Errorf("malformed count = %d, want 3", n)
	}
}

func TestStatsReportsEveryReason(t *testing.T) {
	stats := newRig(Config{}).h.Stats()
	for _, r := range allReasons {
		if n, ok := stats[r]; !ok || n != 0 {
			t.Errorf("fresh stats[%s] = %d, %v", r, n, ok)
		}
	}
}

func FuzzIngestHandle(f *testing.F) {
	f.Add(notification("s3:ObjectCreated:Put", "uploads", "a%2Fb.vhdx", 10, ""))
	f.Add(notification("s3:ObjectCreated:Put", "uploads", "a%2F..%2Fb%01.vhdx", 10, ""))
	f.Add(notification("s3:ObjectCreated:Put", "uploads", "big.raw", 1<<50, ""))
	f.Add([]byte(`{"Records":[{}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := newRig(Config{})
		out, err := r.h.Handle(context.Background(), b)
		if err != nil {
			return
		}
		jobs := 0
		for _, m := range out {
			if m.Subject == events.SubjectConvertJob {
				jobs++
				if job := decodeJob(t, m); unsafeKey(job.Key) != nil || job.Size <= 0 {
					t.Fatalf("queued an unsafe or empty object: %+v", job)
				}
			}
		}
		if jobs != len(r.status.queued) {
			t.Fatalf("%d jobs but %d status records", jobs, len(r.status.queued))
		}
	})
}

func TestUploadThatIsNoDiskImageIsRefusedSayingWhichFormatsAreAccepted(t *testing.T) {
	for _, key := range []string{"disks%2Fwin11", "notes.txt", "notes.txt.gz", "a.qcow2.gz.xz", "bundle.tar"} {
		t.Run(key, func(t *testing.T) {
			r := newRig(Config{})
			out, err := r.h.Handle(context.Background(), put(key, 10))
			if err != nil || len(out) != 1 || out[0].Subject != events.SubjectFailed {
				t.Fatalf("Handle = %+v, %v; want one failed event", out, err)
			}
			var f events.Failed
			if err := out[0].Event.DecodeData(events.TypeFailed, &f); err != nil {
				t.Fatal(err)
			}
			if f.Rule != ReasonExtension || f.Phase != events.PhaseIntake || !strings.Contains(f.Message, "vhdx") || f.Suggestion == "" {
				t.Errorf("failure = %+v", f)
			}
			if stats := r.h.Stats(); stats[ReasonExtension] != 1 {
				t.Errorf("stats = %v, want extension counted once", stats)
			}
		})
	}
}
