package main

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/inspect/ovatest"
)

// Raw outputs' parts that are holes are copied server-side from the
// output bucket's zero object instead of sent. These tests hold every
// such output to what `qemu-img convert -O raw` makes of its input: the
// same sha256, downloaded, and the same CRC64NVME, read back from S3 the
// way any S3 client would.

// rawOf is what `qemu-img convert -O raw` makes of path: its sha256, its
// CRC64NVME (base64, as S3 writes it) and its size.
type rawOf struct {
	sha256, crc string
	size        int64
}

func qemuRaw(t *testing.T, path, format string) rawOf {
	t.Helper()
	out := filepath.Join(t.TempDir(), "expected.raw")
	runTool(t, "qemu-img", "convert", "-q", "-f", format, "-O", "raw", path, out)
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sum, crc := sha256.New(), minio.ChecksumCRC64NVME.Hasher()
	n, err := io.Copy(io.MultiWriter(sum, crc), f)
	if err != nil {
		t.Fatal(err)
	}
	return rawOf{hex.EncodeToString(sum.Sum(nil)), base64.StdEncoding.EncodeToString(crc.Sum(nil)), n}
}

// storedCRC is the output's CRC64NVME as an S3 client reads it: the
// server's full-object checksum (HEAD with x-amz-checksum-mode), or,
// where parts were copied and the server keeps none, the output's tag.
func storedCRC(t *testing.T, key string) (crc string, native bool) {
	t.Helper()
	ctx := context.Background()
	info, err := e2e.s3.StatObject(ctx, "images", key, minio.StatObjectOptions{Checksum: true})
	if err != nil {
		t.Fatal(err)
	}
	if info.ChecksumCRC64NVME != "" {
		return info.ChecksumCRC64NVME, true
	}
	tg, err := e2e.s3.GetObjectTagging(ctx, "images", key, minio.GetObjectTaggingOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return tg.ToMap()[events.TagCRC64NVME], false
}

// checkOutput holds one converted output to want, and returns how much of
// it was copied from the zero object.
func checkOutput(t *testing.T, c events.Converted, want rawOf) float64 {
	t.Helper()
	if c.SHA256 != want.sha256 || c.OutputSize != want.size || c.CRC64NVME != want.crc {
		t.Errorf("%s: event sha256 %s crc64nvme %s size %d, want %s %s %d", c.OutputKey, c.SHA256, c.CRC64NVME, c.OutputSize, want.sha256, want.crc, want.size)
	}
	if got, size := downloadSum(t, c.OutputBucket, c.OutputKey); got != want.sha256 || size != want.size {
		t.Errorf("%s: stored sha256 %s size %d, want %s %d", c.OutputKey, got, size, want.sha256, want.size)
	}
	crc, native := storedCRC(t, c.OutputKey)
	if crc != want.crc {
		t.Errorf("%s: CRC64NVME read back from S3 %q (server's own: %v), want %q", c.OutputKey, crc, native, want.crc)
	}
	if c.DuplicateOf != "" {
		t.Errorf("%s: copied from the earlier output %s, not converted", c.OutputKey, c.DuplicateOf)
	}
	return c.ZeroFraction
}

// serverKeepsCRC reports whether the server itself keeps the output's
// CRC64NVME, as it does for an output whose every part it received.
func serverKeepsCRC(t *testing.T, key string) bool {
	t.Helper()
	_, native := storedCRC(t, key)
	return native
}

// convertImage uploads the image at path under a key of this run's own
// and returns its result.
func convertImage(t *testing.T, res *results, name, path string) events.Converted {
	t.Helper()
	key := fmt.Sprintf("e2e/zeroparts/%d/%s", time.Now().UnixNano(), name)
	upload(t, key, path, false)
	return awaitConvertedWithin(t, res, key, 180*time.Second)
}

func awaitConvertedWithin(t *testing.T, res *results, key string, d time.Duration) events.Converted {
	t.Helper()
	ev := res.await(t, key, d)
	var c events.Converted
	if err := ev.DecodeData(events.TypeConverted, &c); err != nil {
		t.Fatalf("%s: %v: %s", key, err, ev.Data)
	}
	return c
}

// zeroImage is a qcow2 of about size bytes with qemu-io's writes. Its
// virtual size is a few sectors more, different for every image, so that
// no two images are the same content: de-duplication would copy an
// earlier output instead of converting. The few sectors stay under 1 MiB,
// so that an image sized to fit a part does not spill into the next.
// It returns the path and the size.
func zeroImage(t *testing.T, name string, size int64, writes ...string) (string, int64) {
	t.Helper()
	size += 512 * extraSectors(2047)
	path := filepath.Join(t.TempDir(), name)
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", path, strconv.FormatInt(size, 10))
	if len(writes) > 0 {
		args := []string{"-f", "qcow2"}
		for _, w := range writes {
			args = append(args, "-c", w)
		}
		runTool(t, "qemu-io", append(args, path)...)
	}
	return path, size
}

// extraSectors is 1 to n, a different number on each of the first n
// calls in this process: every test in it shares one MinIO, and two
// all-zero images of the same size are the same content. A clock or a
// random draw per image collides now and then (two in 2047 did, in CI).
func extraSectors(n int64) int64 {
	return 1 + (imageBase+imageSeq.Add(1))%n
}

var (
	imageBase = rand.Int64N(1 << 30)
	imageSeq  atomic.Int64
)

func TestRawOutputsWithZeroPartsCopiedServerSideMatchQemuImg(t *testing.T) {
	res := subscribeResults(t)
	const part = 128 << 20
	for _, tc := range []struct {
		name   string
		size   int64
		writes []string
		// zeroParts is how many bytes at the end are copied parts.
		zeroParts func(size int64) int64
		// native: the server keeps the CRC64NVME itself (nothing copied).
		native bool
	}{
		// Data ends in the middle of the second part: the two parts with
		// data are sent, the rest of the image is one copied part. Larger
		// than a part, it is uploaded while it converts.
		{"data-ends-mid-part.qcow2", 400 << 20, []string{"write -P 0x51 0 1M", "write -P 0x52 140M 1M"},
			func(size int64) int64 { return size - 2*part }, false},
		// Nothing but zeros, in one part (uploaded after conversion) and
		// in several (uploaded while it converts).
		{"all-zero-small.qcow2", 64 << 20, nil, func(size int64) int64 { return size }, false},
		{"all-zero.qcow2", 300 << 20, nil, func(size int64) int64 { return size }, false},
		// Data in every part: nothing is copied, and the server keeps
		// the CRC64NVME of an output it received whole.
		{"no-zero-part.qcow2", 100 << 20, []string{"write -P 0x53 0 1M", "write -P 0x54 99M 1M"},
			func(int64) int64 { return 0 }, true},
		{"no-zero-part-streamed.qcow2", 200 << 20, []string{"write -P 0x55 0 1M", "write -P 0x56 199M 1M"},
			func(int64) int64 { return 0 }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path, size := zeroImage(t, tc.name, tc.size, tc.writes...)
			want := qemuRaw(t, path, "qcow2")
			c := convertImage(t, res, tc.name, path)
			if got, want := checkOutput(t, c, want), float64(tc.zeroParts(size))/float64(size); got != want {
				t.Errorf("zero fraction %v, want %v", got, want)
			}
			if tc.native && !serverKeepsCRC(t, c.OutputKey) {
				t.Errorf("%s: every part was sent, yet the server keeps no CRC64NVME", c.OutputKey)
			}
		})
	}
}

func TestOVADiskWithZeroPartsCopiedServerSideMatchesQemuImg(t *testing.T) {
	res := subscribeResults(t)
	dir := t.TempDir()
	disk := filepath.Join(dir, "web-disk1.vmdk")
	// A size of this run's own: the same OVA again would be de-duplicated.
	size := int64(300<<20) + 512*extraSectors(65536)
	runTool(t, "qemu-img", "create", "-q", "-f", "vmdk", disk, strconv.FormatInt(size, 10))
	runTool(t, "qemu-io", "-f", "vmdk", "-c", "write -P 0x61 0 1M", "-c", "write -P 0x62 130M 1M", disk)
	want := qemuRaw(t, disk, "vmdk")
	body, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	m := ovatest.Member{Name: "web-disk1.vmdk", Body: body}
	key := fmt.Sprintf("e2e/zeroparts/%d/web.ova", time.Now().UnixNano())
	putObject(t, key, ovatest.Appliance(t, []ovatest.Member{m}, nil), nil)
	c := awaitConvertedWithin(t, res, key, 180*time.Second)
	if c.OutputKey != events.OVADiskKey("", key, m.Name, "raw") {
		t.Fatalf("OVA disk converted to %s", c.OutputKey)
	}
	if got := checkOutput(t, c, want); got <= 0 {
		t.Errorf("zero fraction %v: no part of the OVA's disk was copied", got)
	}
}

// crcOfZeros is the CRC64NVME of n zero bytes, computed on real zeros.
func crcOfZeros(t *testing.T, n int64) string {
	t.Helper()
	h := minio.ChecksumCRC64NVME.Hasher()
	if _, err := io.Copy(h, io.LimitReader(zeroReader{}, n)); err != nil {
		t.Fatal(err)
	}
	return base64.StdEncoding.EncodeToString(h.Sum(nil))
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// onesReader reads 0xff bytes.
type onesReader struct{}

func (onesReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 0xff
	}
	return len(p), nil
}

func TestZeroObjectDeletedOrOverwrittenBetweenJobsIsWrittenAgain(t *testing.T) {
	res := subscribeResults(t)
	ctx := context.Background()
	zeroKey := events.ZeroObjectKey("")
	// Each job converts an image of its own, or de-duplication would copy
	// the last output instead of making a new one.
	zeroJob := func(t *testing.T, why string) {
		t.Helper()
		path, _ := zeroImage(t, "zero.qcow2", 64<<20)
		if got := checkOutput(t, convertImage(t, res, "zero.qcow2", path), qemuRaw(t, path, "qcow2")); got != 1 {
			t.Errorf("zero fraction %v %s, want 1", got, why)
		}
	}
	// Data in its first part, and the two after copied.
	dataJob := func(t *testing.T) {
		t.Helper()
		path, _ := zeroImage(t, "sparse.qcow2", 300<<20, "write -P 0x71 0 1M")
		if got := checkOutput(t, convertImage(t, res, "sparse.qcow2", path), qemuRaw(t, path, "qcow2")); got <= 0 {
			t.Errorf("zero fraction %v: nothing copied", got)
		}
	}
	for _, damage := range []struct {
		name  string
		spoil func(t *testing.T)
	}{
		{"deleted", func(t *testing.T) {
			if err := e2e.s3.RemoveObject(ctx, "images", zeroKey, minio.RemoveObjectOptions{}); err != nil {
				t.Fatal(err)
			}
		}},
		{"overwritten with ones", func(t *testing.T) {
			info, err := e2e.s3.StatObject(ctx, "images", zeroKey, minio.StatObjectOptions{})
			if err != nil {
				t.Fatal(err)
			}
			// As large as the zero object, and with a CRC64NVME of its
			// own that the server checked and keeps: only comparing that
			// CRC with the CRC of zeros tells it apart.
			ones := io.LimitReader(onesReader{}, info.Size)
			if _, err := e2e.s3.PutObject(ctx, "images", zeroKey, ones, info.Size, minio.PutObjectOptions{
				Checksum: minio.ChecksumCRC64NVME, PartSize: 64 << 20,
			}); err != nil {
				t.Fatal(err)
			}
			spoiled, err := e2e.s3.StatObject(ctx, "images", zeroKey, minio.StatObjectOptions{Checksum: true})
			if err != nil || spoiled.Size != info.Size || spoiled.ChecksumCRC64NVME == "" {
				t.Fatalf("overwritten zero object: %d bytes, CRC64NVME %q, err %v", spoiled.Size, spoiled.ChecksumCRC64NVME, err)
			}
		}},
	} {
		t.Run(damage.name, func(t *testing.T) {
			// A job makes sure the zero object exists before it is spoiled.
			zeroJob(t, "before the zero object was "+damage.name)
			damage.spoil(t)
			zeroJob(t, "after the zero object was "+damage.name)
			dataJob(t)
			// And the zero object is zeros again.
			info, err := e2e.s3.StatObject(ctx, "images", zeroKey, minio.StatObjectOptions{Checksum: true})
			if err != nil {
				t.Fatal(err)
			}
			if got, want := info.ChecksumCRC64NVME, crcOfZeros(t, info.Size); got != want {
				t.Errorf("zero object's CRC64NVME %s, want that of %d zeros, %s", got, info.Size, want)
			}
		})
	}
}
