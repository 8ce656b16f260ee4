package objstore

import (
	"bytes"
	"context"
	"hash/crc64"
	"os"
	"path/filepath"
	"testing"

	"github.com/minio/minio-go/v7"

	"github.com/imagepipe/imagepipe/internal/scratch"
)

const zeroTestKey = ".imagepipe/zeros"

// zeroStore is testStore with a zero object of two test parts, so that
// runs of zeros are merged and cut.
func zeroStore() *Store {
	s := *testStore
	s.zeroObjectSize = 2 * s.growingPart
	return &s
}

// holeyFile writes a file of size bytes that is holes but for data at
// each offset given, and returns its path and its bytes.
func holeyFile(t *testing.T, size int64, data map[int64][]byte) (string, []byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "out.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	for off, b := range data {
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
		copy(want[off:], b)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return path, want
}

func zerosFor(t *testing.T, path string) *Zeros {
	t.Helper()
	h, err := scratch.OpenHoles(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return &Zeros{Holes: h, Key: zeroTestKey}
}

func uploadHoley(t *testing.T, ctx context.Context, s *Store, bucket, key, path string) Object {
	t.Helper()
	f, err := scratch.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	obj, err := s.Upload(ctx, bucket, key, f, nil, nil, Guard{Zeros: zerosFor(t, path)})
	if err != nil {
		t.Fatal(err)
	}
	return obj
}

func crcOf(b []byte) string { return encodeCRC64(crc64.Checksum(b, nvmeTable)) }

func TestUploadCopiesWholePartsOfHolesFromTheZeroObject(t *testing.T) {
	ctx, bucket := testBucket(t)
	s := zeroStore()
	ps := s.growingPart
	// Parts: data, hole, hole, hole, data then hole, a short hole last.
	path, want := holeyFile(t, 5*ps+ps/2, map[int64][]byte{
		0:      pattern(int(ps)),
		4 * ps: pattern(int(ps / 3)),
	})
	obj := uploadHoley(t, ctx, s, bucket, "disk.raw", path)
	if got := objectBytes(t, ctx, bucket, "disk.raw"); !bytes.Equal(got, want) {
		t.Fatalf("object differs from the file (%d bytes, want %d)", len(got), len(want))
	}
	// Two holes merge into one part as long as the zero object, the third
	// is a part of its own, and the short last one too; the part that is
	// only partly zero is sent.
	if wantZero := 3*ps + ps/2; obj.ZeroBytes != wantZero {
		t.Errorf("ZeroBytes = %d, want %d", obj.ZeroBytes, wantZero)
	}
	if obj.CRC64NVME != crcOf(want) {
		t.Errorf("CRC64NVME = %s, want %s", obj.CRC64NVME, crcOf(want))
	}
	zero, err := testStore.Stat(ctx, bucket, zeroTestKey)
	if err != nil {
		t.Fatalf("zero object: %v", err)
	}
	if zero.Size != s.zeroSize() || zero.CRC64NVME != encodeCRC64(crc64Zeros(zero.Size)) {
		t.Errorf("zero object %d bytes, CRC64NVME %s", zero.Size, zero.CRC64NVME)
	}
}

func TestUploadWithoutHolesKeepsAFullObjectCRC64NVMEOnTheServer(t *testing.T) {
	ctx, bucket := testBucket(t)
	s := zeroStore()
	data := pattern(int(2*s.growingPart + 4096))
	path, want := holeyFile(t, int64(len(data)), map[int64][]byte{0: data})
	f, err := scratch.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	obj, err := s.Upload(ctx, bucket, "full.raw", f, nil, nil, Guard{})
	if err != nil {
		t.Fatal(err)
	}
	st, err := testStore.Stat(ctx, bucket, "full.raw")
	if err != nil {
		t.Fatal(err)
	}
	if st.CRC64NVME != crcOf(want) || obj.CRC64NVME != st.CRC64NVME {
		t.Errorf("server's CRC64NVME %q, upload's %q, want %q", st.CRC64NVME, obj.CRC64NVME, crcOf(want))
	}
	if obj.ZeroBytes != 0 {
		t.Errorf("ZeroBytes = %d without holes", obj.ZeroBytes)
	}
}

func TestAMissingOrDamagedZeroObjectIsWrittenAgainBeforeUse(t *testing.T) {
	ctx, bucket := testBucket(t)
	s := zeroStore()
	ps := s.growingPart
	path, want := holeyFile(t, 3*ps, map[int64][]byte{ps: pattern(int(ps))})
	damage := map[string]func(){
		"missing":                   func() {},
		"non-zero bytes, same size": func() { putOther(t, ctx, bucket, zeroTestKey, bytes.Repeat([]byte{1}, int(s.zeroSize()))) },
		"zeros of another size":     func() { putOther(t, ctx, bucket, zeroTestKey, make([]byte, ps)) },
		"zeros but the last byte": func() {
			b := make([]byte, s.zeroSize())
			b[len(b)-1] = 1
			putOther(t, ctx, bucket, zeroTestKey, b)
		},
	}
	for name, spoil := range damage {
		t.Run(name, func(t *testing.T) {
			if err := testStore.Remove(ctx, bucket, zeroTestKey); err != nil {
				t.Fatal(err)
			}
			spoil()
			obj := uploadHoley(t, ctx, s, bucket, "disk.raw", path)
			if got := objectBytes(t, ctx, bucket, "disk.raw"); !bytes.Equal(got, want) {
				t.Fatal("object differs from the file")
			}
			if obj.ZeroBytes != 2*ps || obj.CRC64NVME != crcOf(want) {
				t.Errorf("ZeroBytes %d, CRC64NVME %s; want %d, %s", obj.ZeroBytes, obj.CRC64NVME, 2*ps, crcOf(want))
			}
		})
	}
}

func TestAZeroObjectChangedAfterItsCheckIsCheckedAgain(t *testing.T) {
	ctx, bucket := testBucket(t)
	s := zeroStore()
	core := minio.Core{Client: s.client}
	id, err := startUpload(ctx, core, bucket, "out", nil, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.abort(ctx, core, bucket, "out", id) })
	// As if checked before someone wrote ones over it.
	putOther(t, ctx, bucket, zeroTestKey, bytes.Repeat([]byte{1}, int(s.zeroSize())))
	z := &zeroSource{s: s, bucket: bucket, key: zeroTestKey, size: s.zeroSize(), etag: "0123456789abcdef0123456789abcdef"}
	part, err := z.copyPart(ctx, core, "out", id, 1, s.growingPart)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := core.CompleteMultipartUpload(ctx, bucket, "out", id, []minio.CompletePart{part}, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := objectBytes(t, ctx, bucket, "out"); !bytes.Equal(got, make([]byte, s.growingPart)) {
		t.Fatal("the copied part is not zeros")
	}
}

func TestUploadGrowingCopiesHolesOnceTheirBytesAreFinal(t *testing.T) {
	ctx, bucket := testBucket(t)
	s := zeroStore()
	ps := int(s.growingPart)
	data := pattern(ps)
	size := 4*ps + 4096
	path := filepath.Join(t.TempDir(), "out.raw")
	src, err := scratch.CreateStream(path, int64(size))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	type result struct {
		obj Object
		err error
	}
	done := make(chan result, 1)
	go func() {
		obj, err := s.UploadGrowing(ctx, bucket, "grown.raw", src, int64(size), nil, nil, Guard{Zeros: zerosFor(t, path)})
		done <- result{obj, err}
	}()
	write(t, src, data, 0, ps) // part 1 data; parts 2-3 left as holes
	wantAll := make([]byte, size)
	copy(wantAll, data)
	// Data in the fourth part, written after the holes before it.
	late := pattern(ps)
	if _, err := src.Writer().WriteAt(late[:100], int64(3*ps+10)); err != nil {
		t.Fatal(err)
	}
	copy(wantAll[3*ps+10:], late[:100])
	if err := src.Finish(); err != nil {
		t.Fatal(err)
	}
	res := <-done
	if res.err != nil {
		t.Fatal(res.err)
	}
	if got := objectBytes(t, ctx, bucket, "grown.raw"); !bytes.Equal(got, wantAll) {
		t.Fatal("object differs from the stream")
	}
	if want := int64(2*ps + 4096); res.obj.ZeroBytes != want {
		t.Errorf("ZeroBytes = %d, want %d", res.obj.ZeroBytes, want)
	}
	if res.obj.CRC64NVME != crcOf(wantAll) {
		t.Errorf("CRC64NVME = %s, want %s", res.obj.CRC64NVME, crcOf(wantAll))
	}
}
