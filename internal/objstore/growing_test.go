package objstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/imagepipe/imagepipe/internal/scratch"
	"github.com/imagepipe/imagepipe/test/stack"
)

var testStore *Store

func TestMain(m *testing.M) { stack.Main(m, openTestStore) }

// openTestStore is the store every test of the package uses.
func openTestStore(ms *stack.MinIO) (err error) {
	testStore, err = New(Config{Endpoint: ms.Endpoint, AccessKey: ms.AccessKey, SecretKey: ms.SecretKey})
	if err != nil {
		return err
	}
	// S3's smallest part, so that a test upload has several.
	testStore.growingPart = 5 << 20
	return nil
}

func testBucket(t *testing.T) (context.Context, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(60*time.Second))
	t.Cleanup(cancel)
	bucket := fmt.Sprintf("growing-%d", time.Now().UnixNano())
	if err := testStore.client.MakeBucket(ctx, bucket, minio.MakeBucketOptions{}); err != nil {
		t.Fatal(err)
	}
	return ctx, bucket
}

// newStream is a scratch file the test writes in order, as qemu-img does
// through convert's NBD export.
func newStream(t *testing.T, size int) *scratch.Stream {
	t.Helper()
	st, err := scratch.CreateStream(filepath.Join(t.TempDir(), "out.raw"), int64(size))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	return st
}

func write(t *testing.T, st *scratch.Stream, data []byte, from, to int) {
	t.Helper()
	if _, err := st.Writer().WriteAt(data[from:to], int64(from)); err != nil {
		t.Fatal(err)
	}
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i/4096)
	}
	return b
}

func uploadedParts(t *testing.T, ctx context.Context, bucket, key string) int {
	t.Helper()
	n := 0
	for u := range testStore.client.ListIncompleteUploads(ctx, bucket, key, true) {
		if u.Err != nil {
			t.Fatal(u.Err)
		}
		res, err := minio.Core{Client: testStore.client}.ListObjectParts(ctx, bucket, key, u.UploadID, 0, 1000)
		if err != nil {
			t.Fatal(err)
		}
		n += len(res.ObjectParts)
	}
	return n
}

func eventually(t *testing.T, what string, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(stack.Scaled(20 * time.Second)); !ok(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
	}
}

func TestUploadGrowingSendsPartsAsTheyBecomeFinalAndTheObjectOnlyAtTheEnd(t *testing.T) {
	ctx, bucket := testBucket(t)
	const key = "disk.vhdx.raw"
	data := pattern(12<<20 + 4096) // three parts, the last short
	src := newStream(t, len(data))
	type result struct {
		obj Object
		err error
	}
	done := make(chan result, 1)
	go func() {
		obj, err := testStore.UploadGrowing(ctx, bucket, key, src, int64(len(data)), map[string]string{"imagepipe-job": "j1"}, nil, Guard{})
		done <- result{obj, err}
	}()

	write(t, src, data, 0, 5<<20-4096)
	time.Sleep(200 * time.Millisecond)
	if n := uploadedParts(t, ctx, bucket, key); n != 0 {
		t.Fatalf("%d parts sent before the first was written whole", n)
	}
	write(t, src, data, 5<<20-4096, 5<<20)
	eventually(t, "the first part is uploaded", func() bool { return uploadedParts(t, ctx, bucket, key) == 1 })
	write(t, src, data, 5<<20, 12<<20)
	eventually(t, "the second part is uploaded", func() bool { return uploadedParts(t, ctx, bucket, key) == 2 })
	// Every byte is written, but the writer has not said it is done, and
	// may still fail.
	write(t, src, data, 12<<20, len(data))
	time.Sleep(200 * time.Millisecond)
	if _, err := testStore.Stat(ctx, bucket, key); !IsNotFound(err) {
		t.Fatalf("object visible before its writer finished (stat err %v)", err)
	}
	if err := src.Finish(); err != nil {
		t.Fatal(err)
	}
	res := <-done
	if res.err != nil {
		t.Fatal(res.err)
	}
	if res.obj.Size != int64(len(data)) || res.obj.ETag == "" {
		t.Fatalf("upload result %+v", res.obj)
	}
	rc, info, err := testStore.Open(ctx, bucket, key, "", "")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	got, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatalf("object differs from the source (%d bytes, want %d)", len(got), len(data))
	}
	if info.Metadata["imagepipe-job"] != "j1" {
		t.Fatalf("metadata %v", info.Metadata)
	}
	if n := uploadedParts(t, ctx, bucket, key); n != 0 {
		t.Fatalf("%d parts of an incomplete upload left", n)
	}
}

func TestUploadGrowingOfAFailedWriterLeavesNoObjectAndNoParts(t *testing.T) {
	ctx, bucket := testBucket(t)
	const key = "broken.vhdx.raw"
	data := pattern(12 << 20)
	src := newStream(t, len(data))
	done := make(chan error, 1)
	go func() {
		_, err := testStore.UploadGrowing(ctx, bucket, key, src, int64(len(data)), nil, nil, Guard{})
		done <- err
	}()
	write(t, src, data, 0, 6<<20)
	eventually(t, "the first part is uploaded", func() bool { return uploadedParts(t, ctx, bucket, key) == 1 })
	cause := errors.New("qemu-img exited with status 1")
	src.Fail(cause)
	if err := <-done; !errors.Is(err, cause) {
		t.Fatalf("UploadGrowing = %v, want the writer's error", err)
	}
	if _, err := testStore.Stat(ctx, bucket, key); !IsNotFound(err) {
		t.Fatalf("object of a failed writer exists (stat err %v)", err)
	}
	if n := uploadedParts(t, ctx, bucket, key); n != 0 {
		t.Fatalf("%d parts left behind", n)
	}
}

func TestGrowingPartSizeStaysWithinS3sPartLimit(t *testing.T) {
	for _, size := range []int64{0, 1, 128 << 20, 1 << 40, 2 << 40, 5 << 40} {
		ps := growingPartSize(size, 0)
		if ps < partSize || ps%(1<<20) != 0 || (size+ps-1)/ps > maxParts {
			t.Errorf("size %d: part size %d", size, ps)
		}
	}
}
