package convert

import (
	"bytes"
	"crypto/sha256"
	"math/rand/v2"
	"testing"
)

func TestAsyncHashEqualsTheHashOfEverythingWritten(t *testing.T) {
	data := make([]byte, 3*asyncHashBufferSize*asyncHashBuffers+12345)
	r := rand.New(rand.NewPCG(7, 8))
	for i := range data {
		data[i] = byte(r.Uint32())
	}
	want := sha256.Sum256(data)
	a := newAsyncHash(sha256.New())
	// Chunks larger and smaller than its buffers; a writer reusing its
	// buffer after each Write, as a tee does.
	buf := make([]byte, 5*asyncHashBufferSize/2)
	for p := data; len(p) > 0; {
		n := min(len(p), 1+r.IntN(len(buf)))
		copy(buf, p[:n])
		if m, err := a.Write(buf[:n]); m != n || err != nil {
			t.Fatalf("Write(%d bytes) = %d, %v", n, m, err)
		}
		clear(buf)
		p = p[n:]
	}
	if got := a.Sum(); !bytes.Equal(got, want[:]) {
		t.Fatalf("sha256 %x, want %x", got, want)
	}
	a.Close() // a deferred Close after Sum must not block or panic
}
