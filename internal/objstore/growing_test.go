package objstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/imagepipe/imagepipe/internal/minioserver"
)

var testStore *Store

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "objstore-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	ms, err := minioserver.Start(context.Background(), minioserver.Options{
		DataDir:   filepath.Join(dir, "minio"),
		AccessKey: "objstore-test", SecretKey: "objstore-test-secret",
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer ms.Stop()
	testStore, err = New(Config{Endpoint: ms.Endpoint, AccessKey: "objstore-test", SecretKey: "objstore-test-secret"})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	// S3's smallest part, so that a test upload has several.
	testStore.growingPart = 5 << 20
	return m.Run()
}

func testBucket(t *testing.T) (context.Context, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	bucket := fmt.Sprintf("growing-%d", time.Now().UnixNano())
	if err := testStore.client.MakeBucket(ctx, bucket, minio.MakeBucketOptions{}); err != nil {
		t.Fatal(err)
	}
	return ctx, bucket
}

// growingBytes is a file in memory whose final mark the test moves.
type growingBytes struct {
	data []byte

	mu      sync.Mutex
	final   int64
	err     error
	changed chan struct{}
}

func newGrowingBytes(data []byte) *growingBytes {
	return &growingBytes{data: data, changed: make(chan struct{})}
}

func (g *growingBytes) ReadAt(p []byte, off int64) (int, error) {
	g.mu.Lock()
	final := g.final
	g.mu.Unlock()
	if off+int64(len(p)) > final {
		return 0, fmt.Errorf("read of [%d, %d) before it was final (%d)", off, off+int64(len(p)), final)
	}
	return bytes.NewReader(g.data).ReadAt(p, off)
}

func (g *growingBytes) Wait(ctx context.Context, end int64) error {
	for {
		g.mu.Lock()
		final, err, changed := g.final, g.err, g.changed
		g.mu.Unlock()
		if err != nil {
			return err
		}
		if final >= end {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (g *growingBytes) set(final int64, err error) {
	g.mu.Lock()
	g.final, g.err = final, err
	close(g.changed)
	g.changed = make(chan struct{})
	g.mu.Unlock()
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
	for deadline := time.Now().Add(20 * time.Second); !ok(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
	}
}

func TestUploadGrowingSendsPartsAsTheyBecomeFinalAndTheObjectOnlyAtTheEnd(t *testing.T) {
	ctx, bucket := testBucket(t)
	const key = "disk.vhdx.raw"
	data := pattern(12<<20 + 4096) // three parts, the last short
	src := newGrowingBytes(data)
	type result struct {
		obj Object
		err error
	}
	done := make(chan result, 1)
	go func() {
		obj, err := testStore.UploadGrowing(ctx, bucket, key, src, int64(len(data)), map[string]string{"imagepipe-job": "j1"}, nil)
		done <- result{obj, err}
	}()

	src.set(5<<20, nil)
	eventually(t, "the first part is uploaded", func() bool { return uploadedParts(t, ctx, bucket, key) == 1 })
	src.set(10<<20, nil)
	eventually(t, "the second part is uploaded", func() bool { return uploadedParts(t, ctx, bucket, key) == 2 })
	if _, err := testStore.Stat(ctx, bucket, key); !IsNotFound(err) {
		t.Fatalf("object visible before its writer finished (stat err %v)", err)
	}
	src.set(int64(len(data)), nil)
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
	src := newGrowingBytes(data)
	done := make(chan error, 1)
	go func() {
		_, err := testStore.UploadGrowing(ctx, bucket, key, src, int64(len(data)), nil, nil)
		done <- err
	}()
	src.set(5<<20, nil)
	eventually(t, "the first part is uploaded", func() bool { return uploadedParts(t, ctx, bucket, key) == 1 })
	cause := errors.New("qemu-img exited with status 1")
	src.set(5<<20, cause)
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
