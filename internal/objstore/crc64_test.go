package objstore

import (
	"encoding/base64"
	"hash/crc64"
	"math/rand/v2"
	"testing"

	"github.com/minio/minio-go/v7"
)

var nvmeTable = crc64.MakeTable(crc64NVMEPoly)

func TestCRC64OfZerosByFormulaMatchesTheCRCOfRealZeros(t *testing.T) {
	zeros := make([]byte, 9<<20+13)
	for _, n := range []int{0, 1, 7, 8, 4095, 4096, 1 << 20, 5<<20 + 1, len(zeros)} {
		want := crc64.Checksum(zeros[:n], nvmeTable)
		if got := crc64Zeros(int64(n)); got != want {
			t.Errorf("CRC64NVME of %d zero bytes: formula %#x, hash/crc64 %#x", n, got, want)
		}
	}
	// And the table is S3's CRC64NVME, as minio-go computes it.
	h := minio.ChecksumCRC64NVME.Hasher()
	h.Write(zeros[:12345])
	if got, want := encodeCRC64(crc64Zeros(12345)), base64.StdEncoding.EncodeToString(h.Sum(nil)); got != want {
		t.Errorf("CRC64NVME of 12345 zeros: formula %s, minio-go %s", got, want)
	}
}

func TestCRC64CombineOfPartsIsTheCRCOfTheWhole(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 3<<20)
	for i := range buf {
		buf[i] = byte(r.Uint32())
	}
	for _, cut := range []int{0, 1, 4096, 1<<20 + 3, len(buf)} {
		a, b := buf[:cut], buf[cut:]
		got := crc64Combine(crc64.Checksum(a, nvmeTable), crc64.Checksum(b, nvmeTable), int64(len(b)))
		if want := crc64.Checksum(buf, nvmeTable); got != want {
			t.Errorf("cut at %d: combined %#x, whole %#x", cut, got, want)
		}
	}
}
