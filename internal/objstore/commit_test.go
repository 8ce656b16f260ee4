package objstore

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/imagepipe/imagepipe/internal/scratch"
)

// sparseFile writes data to a scratch file and opens it as Upload takes it.
func sparseFile(t *testing.T, data []byte) *scratch.File {
	t.Helper()
	path := filepath.Join(t.TempDir(), "out.raw")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := scratch.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// putOther is another writer completing the key.
func putOther(t *testing.T, ctx context.Context, bucket, key string, body []byte) {
	t.Helper()
	if _, err := testStore.client.PutObject(ctx, bucket, key, bytes.NewReader(body), int64(len(body)), minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
}

func objectBytes(t *testing.T, ctx context.Context, bucket, key string) []byte {
	t.Helper()
	rc, _, err := testStore.Open(ctx, bucket, key, "", "")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func incompleteUploads(t *testing.T, ctx context.Context, bucket, key string) []string {
	t.Helper()
	var ids []string
	for u := range testStore.client.ListIncompleteUploads(ctx, bucket, key, true) {
		if u.Err != nil {
			t.Fatal(u.Err)
		}
		ids = append(ids, u.UploadID)
	}
	return ids
}

var errStale = errors.New("the input is no longer the version this output was made from")

func TestUploadDoesNotOverwriteAWriterThatCompletedAfterItsGuardRan(t *testing.T) {
	for _, newer := range []bool{true, false} {
		name := map[bool]string{true: "the other writer is newer: ours is vetoed", false: "the other writer is older: ours replaces it"}[newer]
		t.Run(name, func(t *testing.T) {
			ctx, bucket := testBucket(t)
			const key = "disk.vhdx.raw"
			ours, theirs := pattern(7<<20), []byte("the other writer's output")
			var rounds atomic.Int32
			guard := func(ctx context.Context) error {
				switch rounds.Add(1) {
				case 1:
					// Between the read of the destination and the
					// completion, another writer completes.
					putOther(t, ctx, bucket, key, theirs)
					return nil
				default:
					if newer {
						return errStale
					}
					return nil
				}
			}
			_, err := testStore.Upload(ctx, bucket, key, sparseFile(t, ours), nil, nil, Guard{Check: guard})
			if rounds.Load() != 2 {
				t.Fatalf("guard ran %d times, want 2: the completion over the other write must fail and be decided again", rounds.Load())
			}
			want := ours
			if newer {
				want = theirs
				if !errors.Is(err, errStale) {
					t.Fatalf("Upload = %v, want the guard's veto", err)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			if got := objectBytes(t, ctx, bucket, key); !bytes.Equal(got, want) {
				t.Fatalf("object holds %d bytes, want %d (newer=%v)", len(got), len(want), newer)
			}
			if ids := incompleteUploads(t, ctx, bucket, key); len(ids) != 0 {
				t.Fatalf("incomplete uploads left: %v", ids)
			}
		})
	}
}

func TestCompleteFailsPreconditionWhenOtherWritersKeepCompleting(t *testing.T) {
	ctx, bucket := testBucket(t)
	const key = "contended.raw"
	putOther(t, ctx, bucket, key, []byte("first"))
	var n atomic.Int32
	guard := func(ctx context.Context) error {
		putOther(t, ctx, bucket, key, []byte{byte('a' + n.Add(1))})
		return nil
	}
	_, err := testStore.Upload(ctx, bucket, key, sparseFile(t, pattern(1<<20)), nil, nil, Guard{Check: guard})
	if !errors.Is(err, ErrContended) || !IsChanged(err) {
		t.Fatalf("Upload = %v, want ErrContended carrying MinIO's PreconditionFailed", err)
	}
	if got := objectBytes(t, ctx, bucket, key); !bytes.Equal(got, []byte{byte('a' + n.Load())}) {
		t.Fatalf("object holds %q, want the last other writer's", got)
	}
}

func TestVetoedWriteAbortsOnlyItsOwnUpload(t *testing.T) {
	ctx, bucket := testBucket(t)
	const key = "shared.raw"
	// Another job's upload of the same key, still in progress.
	core := minio.Core{Client: testStore.client}
	otherID, err := core.NewMultipartUpload(ctx, bucket, key, minio.PutObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	otherData := pattern(3 << 20)
	part, err := core.PutObjectPart(ctx, bucket, key, otherID, 1, bytes.NewReader(otherData), int64(len(otherData)), minio.PutObjectPartOptions{})
	if err != nil {
		t.Fatal(err)
	}

	veto := Guard{Check: func(context.Context) error { return errStale }}
	if _, err := testStore.Upload(ctx, bucket, key, sparseFile(t, pattern(6<<20)), nil, nil, veto); !errors.Is(err, errStale) {
		t.Fatalf("Upload = %v, want the veto", err)
	}
	src := newStream(t, 6<<20)
	write(t, src, pattern(6<<20), 0, 6<<20)
	if err := src.Finish(); err != nil {
		t.Fatal(err)
	}
	if _, err := testStore.UploadGrowing(ctx, bucket, key, src, 6<<20, nil, nil, veto); !errors.Is(err, errStale) {
		t.Fatalf("UploadGrowing = %v, want the veto", err)
	}
	putOther(t, ctx, bucket, "copy-source", pattern(6<<20))
	if _, err := testStore.Copy(ctx, bucket, "copy-source", "", "", bucket, key, nil, nil, veto); !errors.Is(err, errStale) {
		t.Fatalf("Copy = %v, want the veto", err)
	}
	if _, err := testStore.Stat(ctx, bucket, key); !IsNotFound(err) {
		t.Fatalf("a vetoed write left an object (stat err %v)", err)
	}
	if ids := incompleteUploads(t, ctx, bucket, key); len(ids) != 1 || ids[0] != otherID {
		t.Fatalf("incomplete uploads %v, want only the other job's %s", ids, otherID)
	}
	if _, err := core.CompleteMultipartUpload(ctx, bucket, key, otherID, []minio.CompletePart{{PartNumber: 1, ETag: part.ETag}}, minio.PutObjectOptions{}); err != nil {
		t.Fatalf("the other job's upload cannot complete: %v", err)
	}
	if got := objectBytes(t, ctx, bucket, key); !bytes.Equal(got, otherData) {
		t.Fatalf("object holds %d bytes, want the other job's %d", len(got), len(otherData))
	}
}

func TestCopyWritesMetadataAndTagsAndFailsWhenTheSourceChanged(t *testing.T) {
	ctx, bucket := testBucket(t)
	data := pattern(11 << 20) // three parts of 5 MiB, the last short
	putOther(t, ctx, bucket, "in.raw", data)
	src, err := testStore.Stat(ctx, bucket, "in.raw")
	if err != nil {
		t.Fatal(err)
	}
	var started []string
	obj, err := testStore.Copy(ctx, bucket, "in.raw", src.VersionID, src.ETag, bucket, "out.raw",
		map[string]string{"imagepipe-job": "j1"}, map[string]string{"imagepipe-sha256": "abc"},
		Guard{Check: func(context.Context) error { return nil }, Started: func(id string) { started = append(started, id) }})
	if err != nil {
		t.Fatal(err)
	}
	if len(started) != 1 || started[0] == "" {
		t.Errorf("Started told of uploads %q, want the copy's one", started)
	}
	if obj.Size != int64(len(data)) {
		t.Fatalf("copy size %d, want %d", obj.Size, len(data))
	}
	if got := objectBytes(t, ctx, bucket, "out.raw"); !bytes.Equal(got, data) {
		t.Fatal("copy differs from its source")
	}
	out, err := testStore.Stat(ctx, bucket, "out.raw")
	if err != nil {
		t.Fatal(err)
	}
	tags, err := testStore.Tags(ctx, bucket, "out.raw")
	if err != nil {
		t.Fatal(err)
	}
	if out.Metadata["imagepipe-job"] != "j1" || tags["imagepipe-sha256"] != "abc" {
		t.Fatalf("metadata %v tags %v", out.Metadata, tags)
	}

	putOther(t, ctx, bucket, "in.raw", []byte("a newer upload"))
	if _, err := testStore.Copy(ctx, bucket, "in.raw", "", src.ETag, bucket, "out2.raw", nil, nil, Guard{}); !IsChanged(err) {
		t.Fatalf("Copy of a changed source = %v, want PreconditionFailed", err)
	}
	if ids := incompleteUploads(t, ctx, bucket, "out2.raw"); len(ids) != 0 {
		t.Fatalf("incomplete uploads left: %v", ids)
	}
}

func TestAbortRemovesTheNamedUploadAndNoOther(t *testing.T) {
	ctx, bucket := testBucket(t)
	core := minio.Core{Client: testStore.Client()}
	const key = "out.raw"
	dead, err := core.NewMultipartUpload(ctx, bucket, key, minio.PutObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	live, err := core.NewMultipartUpload(ctx, bucket, key, minio.PutObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := testStore.Abort(ctx, bucket, key, dead); err != nil {
		t.Fatal(err)
	}
	if err := testStore.Abort(ctx, bucket, key, dead); err != nil {
		t.Errorf("aborting an upload already gone = %v, want nil", err)
	}
	left, err := testStore.Pending(ctx, bucket, key)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) != 1 || left[0].UploadID != live || time.Since(left[0].Initiated) > time.Minute {
		t.Errorf("uploads left %+v, want only the live writer's %s, initiated just now", left, live)
	}
}

// pausedReader yields first, then waits for resume before yielding rest.
type pausedReader struct {
	first, rest []byte
	paused      chan struct{}
	resume      chan struct{}
	stage       int
}

func (p *pausedReader) Read(b []byte) (int, error) {
	switch p.stage {
	case 0:
		n := copy(b, p.first)
		p.first = p.first[n:]
		if len(p.first) == 0 {
			p.stage++
		}
		return n, nil
	case 1:
		close(p.paused)
		<-p.resume
		p.stage++
		fallthrough
	default:
		if len(p.rest) == 0 {
			return 0, io.EOF
		}
		n := copy(b, p.rest)
		p.rest = p.rest[n:]
		return n, nil
	}
}

func TestStreamPutIfAbsentKeepsAnObjectStoredWhileItRan(t *testing.T) {
	ctx, bucket := testBucket(t)
	data := pattern(20 << 20) // two parts
	if err := testStore.PutStream(ctx, bucket, "new", bytes.NewReader(data), int64(len(data)), 0, nil, true); err != nil {
		t.Fatalf("put to a free key: %v", err)
	}
	if got := objectBytes(t, ctx, bucket, "new"); !bytes.Equal(got, data) {
		t.Fatal("stored bytes differ")
	}
	if err := testStore.PutStream(ctx, bucket, "new", bytes.NewReader(data), -1, minPartSize, nil, true); !IsChanged(err) {
		t.Errorf("put onto an existing key = %v, want a failed precondition", err)
	}

	r := &pausedReader{first: data[:10<<20], rest: data[10<<20:], paused: make(chan struct{}), resume: make(chan struct{})}
	errc := make(chan error, 1)
	go func() { errc <- testStore.PutStream(ctx, bucket, "raced", r, int64(len(data)), 0, nil, true) }()
	<-r.paused
	theirs := []byte("an upload that landed meanwhile")
	putOther(t, ctx, bucket, "raced", theirs)
	close(r.resume)
	if err := <-errc; !IsChanged(err) {
		t.Fatalf("put over an object stored while it ran = %v, want a failed precondition", err)
	}
	if got := objectBytes(t, ctx, bucket, "raced"); !bytes.Equal(got, theirs) {
		t.Error("the object stored meanwhile was replaced")
	}
	left, err := minio.Core{Client: testStore.Client()}.ListMultipartUploads(ctx, bucket, "raced", "", "", "", 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(left.Uploads) != 0 {
		t.Errorf("%d uploads left behind", len(left.Uploads))
	}
}
