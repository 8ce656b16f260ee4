package ingest

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/objstore"
)

func TestReconvertQueuesAFreshJobThatBypassesDeduplication(t *testing.T) {
	ctx := context.Background()
	obj := objstore.Object{Bucket: "uploads", Key: "disks/a.vhdx", Size: 100, ETag: "e1", VersionID: "v1", Metadata: map[string]string{}}
	r := newRig(Config{}, obj)
	ident := events.ObjectIdentity("uploads", "disks/a.vhdx", "v1", "e1")
	r.status.Set(ctx, events.Status{Bucket: "uploads", Key: "disks/a.vhdx", JobID: events.JobIDFor(ident), State: events.StateReady})

	id1, err := r.h.Reconvert(ctx, events.ReconvertRequest{Bucket: "uploads", Key: "disks/a.vhdx", Format: "QCOW2"})
	if err != nil {
		t.Fatal(err)
	}
	id2, err := r.h.Reconvert(ctx, events.ReconvertRequest{Bucket: "uploads", Key: "disks/a.vhdx"})
	if err != nil {
		t.Fatal(err)
	}
	msgs := r.pub.all()
	if len(msgs) != 2 {
		t.Fatalf("published %d messages, want 2", len(msgs))
	}
	job := decodeJob(t, msgs[0])
	want := events.ConvertJob{JobID: id1, Bucket: "uploads", Key: "disks/a.vhdx", VersionID: "v1", ETag: "e1", Size: 100,
		OutputFormat: "qcow2", NoDedup: true, Reason: "reconvert", QueuedAt: testNow}
	if job != want {
		t.Errorf("job =\n%+v\nwant\n%+v", job, want)
	}
	if id1 == id2 || id1 == events.JobIDFor(ident) || msgs[0].Event.ID == msgs[1].Event.ID || msgs[0].Event.ID == ident {
		t.Errorf("job ids %s %s and event ids %s %s are not fresh", id1, id2, msgs[0].Event.ID, msgs[1].Event.ID)
	}
	if decodeJob(t, msgs[1]).OutputFormat != "" {
		t.Error("a re-convert without format overrides the converter's")
	}
	if st, _ := r.status.record("uploads", "disks/a.vhdx"); st.State != events.StateQueued || st.JobID != id2 {
		t.Errorf("status = %+v, want QUEUED for the last job", st)
	}
}

func TestReconvertRefusesWithAPlainReason(t *testing.T) {
	objs := []objstore.Object{
		{Bucket: "uploads", Key: "a.vhdx", Size: 10, ETag: "e", Metadata: map[string]string{}},
		{Bucket: "uploads", Key: "out.raw", Size: 10, ETag: "e", Metadata: map[string]string{"imagepipe-output": "true"}},
		{Bucket: "uploads", Key: "empty.vhdx", Size: 0, ETag: "e", Metadata: map[string]string{}},
		{Bucket: "uploads", Key: "huge.vhdx", Size: 1 << 50, ETag: "e", Metadata: map[string]string{}},
		{Bucket: "uploads", Key: "ctl\x01.vhdx", Size: 10, ETag: "e", Metadata: map[string]string{}},
		{Bucket: "uploads", Key: "errors/a.vhdx.error.json", Size: 10, ETag: "e", Metadata: map[string]string{}},
	}
	tests := []struct {
		req  events.ReconvertRequest
		want string
	}{
		{events.ReconvertRequest{Bucket: "uploads", Key: "missing.vhdx"}, "no object uploads/missing.vhdx exists"},
		{events.ReconvertRequest{Bucket: "images", Key: "a.vhdx.raw"}, `"images" is not the input bucket`},
		{events.ReconvertRequest{Bucket: "uploads"}, "no key"},
		{events.ReconvertRequest{Bucket: "uploads", Key: "a.vhdx", Format: "vmdk"}, `"vmdk" is not raw or qcow2`},
		{events.ReconvertRequest{Bucket: "uploads", Key: "out.raw"}, "is an imagepipe output"},
		{events.ReconvertRequest{Bucket: "uploads", Key: "empty.vhdx"}, "is empty"},
		{events.ReconvertRequest{Bucket: "uploads", Key: "huge.vhdx"}, "IMAGEPIPE_MAX_INPUT_SIZE"},
		{events.ReconvertRequest{Bucket: "uploads", Key: "ctl\x01.vhdx"}, "control character"},
		{events.ReconvertRequest{Bucket: "uploads", Key: "errors/a.vhdx.error.json"}, "error report"},
	}
	for _, tt := range tests {
		r := newRig(Config{}, objs...)
		_, err := r.h.Reconvert(context.Background(), tt.req)
		if !IsRequestError(err) || !strings.Contains(err.Error(), tt.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("Reconvert(%+v) = %v; want a one-line request error saying %q", tt.req, err, tt.want)
		}
		if len(r.pub.all()) != 0 || len(r.status.queued) != 0 {
			t.Errorf("Reconvert(%+v) queued something", tt.req)
		}
	}
}

func TestReconvertRestoresTheStatusWhenTheJobCannotBePublished(t *testing.T) {
	ctx := context.Background()
	r := newRig(Config{}, objstore.Object{Bucket: "uploads", Key: "a.vhdx", Size: 10, ETag: "e", Metadata: map[string]string{}})
	before := events.Status{Bucket: "uploads", Key: "a.vhdx", JobID: "old", State: events.StateReady, UpdatedAt: testNow.Add(-time.Hour)}
	r.status.Set(ctx, before)
	r.pub.err = errors.New("jetstream unavailable")
	if _, err := r.h.Reconvert(ctx, events.ReconvertRequest{Bucket: "uploads", Key: "a.vhdx"}); err == nil || IsRequestError(err) {
		t.Errorf("err = %v, want a server-side error", err)
	}
	if st, _ := r.status.record("uploads", "a.vhdx"); st != before {
		t.Errorf("status = %+v, want the earlier %+v", st, before)
	}
}
