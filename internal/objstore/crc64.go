package objstore

import (
	"encoding/base64"
	"encoding/binary"
)

// An output's CRC64NVME is S3's full-object checksum: the CRC of the whole
// object, which any S3 client can ask for without downloading it. It is
// put together from the CRCs of the parts, each known on its own: a sent
// part's from its bytes as they go, a zero run's from its length alone.
// The algebra is zlib's crc32_combine, for 64 bits: appending n bytes to
// a message multiplies its CRC register by x^(8n) modulo the polynomial.

// crc64NVMEPoly is the CRC64NVME polynomial, bit-reflected as the CRC
// is computed (0xad93d23594c93659 reversed).
const crc64NVMEPoly = 0x9a6c9329ac4bc9b5

// x2n[k] is x^(2^k) modulo the polynomial.
var x2n = func() (t [64]uint64) {
	p := uint64(1) << 62 // x^1; x^0 is the top bit in reflected order
	for k := range t {
		t[k] = p
		p = multModP(p, p)
	}
	return t
}()

// multModP is a·b modulo the polynomial, both reflected.
func multModP(a, b uint64) uint64 {
	var p uint64
	for m := uint64(1) << 63; m != 0; m >>= 1 {
		if a&m != 0 {
			p ^= b
		}
		if b&1 != 0 {
			b = b>>1 ^ crc64NVMEPoly
		} else {
			b >>= 1
		}
	}
	return p
}

// xPow8N is x^(8n) modulo the polynomial: n bytes of shift.
func xPow8N(n int64) uint64 {
	p := uint64(1) << 63
	for k := 3; n != 0; n, k = n>>1, k+1 {
		if n&1 != 0 {
			p = multModP(x2n[k&63], p)
		}
	}
	return p
}

// crc64Combine is the CRC of a followed by b, given their CRCs and the
// length of b.
func crc64Combine(crcA, crcB uint64, lenB int64) uint64 {
	return multModP(xPow8N(lenB), crcA) ^ crcB
}

// crc64Zeros is the CRC of n zero bytes, computed without them: the
// register starts all ones, zeros only shift it, and it ends inverted.
func crc64Zeros(n int64) uint64 {
	return multModP(xPow8N(n), ^uint64(0)) ^ ^uint64(0)
}

// encodeCRC64 is a CRC as S3 writes it: big-endian, base64.
func encodeCRC64(crc uint64) string {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], crc)
	return base64.StdEncoding.EncodeToString(b[:])
}

// decodeCRC64 reads a CRC as S3 writes it.
func decodeCRC64(s string) (uint64, bool) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(b) != 8 {
		return 0, false
	}
	return binary.BigEndian.Uint64(b), true
}
