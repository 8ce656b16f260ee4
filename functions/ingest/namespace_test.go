package ingest

import (
	"context"
	"strings"
	"testing"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/objstore"
)

func TestIngestRefusesKeysWithTheSegmentKeptForOVADisks(t *testing.T) {
	for _, key := range []string{"x/.ova-disks/y.vmdk", ".ova-disks/y.vmdk", "apps/web.ova/.ova-disks/disk.vmdk"} {
		r := newRig(Config{})
		out, err := r.h.Handle(context.Background(), put(strings.ReplaceAll(key, "/", "%2F"), 10))
		if err != nil {
			t.Fatal(err)
		}
		if len(out) != 1 || out[0].Subject != events.SubjectFailed {
			t.Fatalf("%s: Handle = %v, want one failure event", key, out)
		}
		f := decodeFailed(t, out[0])
		if f.Rule != ReasonReservedKey || !strings.Contains(f.Message, events.OVADisksSegment) || f.WillRetry {
			t.Errorf("%s: failure = %+v, want rule %s naming %s", key, f, ReasonReservedKey, events.OVADisksSegment)
		}
	}
	// A look-alike segment is an ordinary key.
	r := newRig(Config{})
	if _, err := r.h.Handle(context.Background(), put("x%2F.ova-disks2%2Fy.vmdk", 10)); err != nil || r.h.Stats()[ReasonQueued] != 1 {
		t.Errorf("x/.ova-disks2/y.vmdk not queued: %v %v", r.h.Stats(), err)
	}
}

func sameBucketConfig() Config {
	return Config{InputBucket: "data", OutputBucket: "data", OutputPrefix: "converted/"}
}

func TestIngestSkipsOutputsUnderThePrefixWhenTheBucketsAreOne(t *testing.T) {
	// No metadata in the notification, and none on the objects: only the
	// prefix says which is an output.
	r := newRig(sameBucketConfig(),
		objstore.Object{Bucket: "data", Key: "converted/a.vhdx.raw", Size: 10, ETag: "e1", Metadata: map[string]string{}},
		objstore.Object{Bucket: "data", Key: "a.vhdx.raw", Size: 10, ETag: "e2", Metadata: map[string]string{}})
	out, err := r.h.Handle(context.Background(), notification("s3:ObjectCreated:Put", "data", "converted%2Fa.vhdx.raw", 10, ""))
	if err != nil || len(out) != 0 || r.h.Stats()[ReasonOutputPrefix] != 1 {
		t.Errorf("Handle = %v, %v; stats %v; want skipped as %s", out, err, r.h.Stats(), ReasonOutputPrefix)
	}
	// Beside it, a user's own a.vhdx.raw is an upload like any other.
	if _, err := r.h.Handle(context.Background(), notification("s3:ObjectCreated:Put", "data", "a.vhdx.raw", 10, "")); err != nil || r.h.Stats()[ReasonQueued] != 1 {
		t.Errorf("a.vhdx.raw not queued: %v %v", r.h.Stats(), err)
	}
}

func TestOutputPrefixIsAnOrdinaryFolderWhenTheBucketsDiffer(t *testing.T) {
	r := newRig(Config{InputBucket: "uploads", OutputBucket: "images", OutputPrefix: "converted/"})
	if _, err := r.h.Handle(context.Background(), put("converted%2Fa.vhdx", 10)); err != nil || r.h.Stats()[ReasonQueued] != 1 {
		t.Errorf("converted/a.vhdx not queued: %v %v", r.h.Stats(), err)
	}
}

func TestReconcileNeverTakesOutputsIn(t *testing.T) {
	ctx := context.Background()
	r := newRig(sameBucketConfig(),
		objstore.Object{Bucket: "data", Key: "converted/a.vhdx.raw", Size: 10, ETag: "e1", Metadata: map[string]string{}},
		objstore.Object{Bucket: "data", Key: "converted/b.vhdx", Size: 10, ETag: "e2", Metadata: map[string]string{}},
		objstore.Object{Bucket: "data", Key: "a.vhdx", Size: 10, ETag: "e3", Metadata: map[string]string{}},
	)
	res, err := r.h.Reconcile(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if res.Listed != 3 || res.Queued != 1 || res.Refused != 0 || len(res.Keys) != 1 || res.Keys[0] != "a.vhdx" {
		t.Errorf("reconcile = %+v, want only a.vhdx queued", res)
	}
	if res, err := r.h.Reconcile(ctx, "converted/"); err != nil || res.Queued != 0 {
		t.Errorf("reconcile of the output prefix = %+v, %v; want nothing queued", res, err)
	}
}

func TestReconvertRefusesOutputsAndReservedKeys(t *testing.T) {
	r := newRig(sameBucketConfig(),
		objstore.Object{Bucket: "data", Key: "converted/a.vhdx.raw", Size: 10, ETag: "e1", Metadata: map[string]string{}},
		objstore.Object{Bucket: "data", Key: "x/.ova-disks/y.vmdk", Size: 10, ETag: "e2", Metadata: map[string]string{}},
	)
	for key, want := range map[string]string{"converted/a.vhdx.raw": "IMAGEPIPE_OUTPUT_PREFIX", "x/.ova-disks/y.vmdk": events.OVADisksSegment} {
		_, err := r.h.Reconvert(context.Background(), events.ReconvertRequest{Bucket: "data", Key: key})
		if !IsRequestError(err) || !strings.Contains(err.Error(), want) {
			t.Errorf("reconvert %s = %v, want a request error naming %s", key, err, want)
		}
	}
}

func TestOutputLayoutRefusesOneBucketWithoutAPrefix(t *testing.T) {
	tests := []struct {
		in, out, prefix string
		want            string // the prefix returned, or "" with wantErr
		wantErr         []string
	}{
		{in: "uploads", out: "images", prefix: "", want: ""},
		{in: "uploads", out: "images", prefix: "converted", want: "converted/"},
		{in: "data", out: "data", prefix: "converted/", want: "converted/"},
		{in: "data", out: "data", prefix: "out", want: "out/"},
		{in: "data", out: "data", prefix: "", wantErr: []string{"IMAGEPIPE_INPUT_BUCKET", "IMAGEPIPE_OUTPUT_BUCKET", "IMAGEPIPE_OUTPUT_PREFIX", `"data"`}},
		{in: "data", out: "data", prefix: "errors/", wantErr: []string{"IMAGEPIPE_OUTPUT_PREFIX", "errors/"}},
		{in: "data", out: "data", prefix: "errors", wantErr: []string{"IMAGEPIPE_OUTPUT_PREFIX", "errors/"}},
		{in: "data", out: "data", prefix: "errors/converted/", wantErr: []string{"IMAGEPIPE_OUTPUT_PREFIX", "errors/"}},
		{in: "uploads", out: "images", prefix: "a/../b/", wantErr: []string{"IMAGEPIPE_OUTPUT_PREFIX", ".."}},
	}
	for _, tt := range tests {
		got, err := OutputLayout(tt.in, tt.out, tt.prefix)
		if len(tt.wantErr) == 0 {
			if err != nil || got != tt.want {
				t.Errorf("OutputLayout(%q, %q, %q) = %q, %v; want %q", tt.in, tt.out, tt.prefix, got, err, tt.want)
			}
			continue
		}
		if err == nil {
			t.Errorf("OutputLayout(%q, %q, %q) = %q, want an error", tt.in, tt.out, tt.prefix, got)
			continue
		}
		for _, w := range tt.wantErr {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("OutputLayout(%q, %q, %q) error %q does not name %s", tt.in, tt.out, tt.prefix, err, w)
			}
		}
	}
}

func TestKeysWhoseOutputUnderThePrefixWouldNotFitAreRefused(t *testing.T) {
	cfg := sameBucketConfig()
	// Folders of 200 bytes: MinIO holds no segment over 255.
	long := events.MaxKeyLen - len(".qcow2") - len(cfg.OutputPrefix) + 1
	key := strings.Repeat(strings.Repeat("k", 199)+"/", long/200)
	key += strings.Repeat("n", long-len(key)-len(".vhdx")) + ".vhdx"
	r := newRig(cfg, objstore.Object{Bucket: "data", Key: key, Size: 10, ETag: "e", Metadata: map[string]string{}})
	out, err := r.h.Handle(context.Background(), notification("s3:ObjectCreated:Put", "data", key, 10, ""))
	if err != nil || len(out) != 1 || decodeFailed(t, out[0]).Rule != ReasonUnsafeKey {
		t.Fatalf("Handle = %v, %v; want refused as %s", out, err, ReasonUnsafeKey)
	}
	if !strings.Contains(decodeFailed(t, out[0]).Message, "IMAGEPIPE_OUTPUT_PREFIX") {
		t.Errorf("message %q does not name IMAGEPIPE_OUTPUT_PREFIX", decodeFailed(t, out[0]).Message)
	}
}

func TestKeysWhoseOutputFileNameWouldNotFitASegmentAreRefused(t *testing.T) {
	key := "disks/" + strings.Repeat("n", events.MaxSegmentLen-len(".qcow2")-len(".vhdx")+1) + ".vhdx"
	r := newRig(Config{InputBucket: "uploads", OutputBucket: "images"}, objstore.Object{Bucket: "uploads", Key: key, Size: 10, ETag: "e", Metadata: map[string]string{}})
	out, err := r.h.Handle(context.Background(), notification("s3:ObjectCreated:Put", "uploads", key, 10, ""))
	if err != nil || len(out) != 1 || decodeFailed(t, out[0]).Rule != ReasonUnsafeKey {
		t.Fatalf("Handle = %v, %v; want refused as %s", out, err, ReasonUnsafeKey)
	}
	if msg := decodeFailed(t, out[0]).Message; !strings.Contains(msg, "255-byte limit on one segment") {
		t.Errorf("message %q does not name the segment limit", msg)
	}
}
