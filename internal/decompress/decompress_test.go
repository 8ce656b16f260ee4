//go:build unix

package decompress

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/klauspost/compress/zstd"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/decompress/decompresstest"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/scratch"
)

// zeros reads as n zero bytes without holding them.
type zeros struct{ n int64 }

func (z *zeros) Read(p []byte) (int, error) {
	if z.n == 0 {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), z.n)]
	clear(p)
	z.n -= int64(len(p))
	return len(p), nil
}

// filled reads as n copies of b without holding them.
type filled struct {
	b byte
	n int64
}

func (f *filled) Read(p []byte) (int, error) {
	if f.n == 0 {
		return 0, io.EOF
	}
	p = p[:min(int64(len(p)), f.n)]
	for i := range p {
		p[i] = f.b
	}
	f.n -= int64(len(p))
	return len(p), nil
}

// constantFree is a file system with free bytes free whatever is written.
func constantFree(free int64) func(string) (int64, int64, error) {
	return func(string) (int64, int64, error) { return free, free, nil }
}

// fakeDisk is a file system of capacity bytes that others fill as well:
// its free space is what neither they nor the data of the files in the
// directory looked at take. The data is counted from the files' extents,
// not their allocated blocks: those also count the file system's own
// metadata (an ext4 file in more than four extents gets a 4 KiB extent
// block), which would make the tests' arithmetic depend on how
// fragmented the disk they run on is.
type fakeDisk struct {
	t        *testing.T
	capacity int64
	others   func(look int) int64
	looks    int
}

func (d *fakeDisk) free(dir string) (int64, int64, error) {
	d.looks++
	ours := int64(0)
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0, 0, err
	}
	for _, e := range entries {
		f, err := scratch.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			return 0, 0, err
		}
		ours += f.DataBytes()
		f.Close()
	}
	return d.capacity - d.others(d.looks) - ours, d.capacity, nil
}

func expand(t *testing.T, r io.Reader, b Budget) (Result, string, error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "input")
	res, err := Expand(context.Background(), r, path, b)
	return res, path, err
}

func TestDetectKnowsCodecsByMagicNumberNotName(t *testing.T) {
	data := []byte("imagepipe")
	for codec, body := range map[Codec][]byte{
		Gzip: decompresstest.Compressed(t, data, decompresstest.Gzip),
		XZ:   decompresstest.Compressed(t, data, decompresstest.XZWithDict(1<<20)),
		Zstd: decompresstest.ZstdRun('x', 10),
		None: []byte("QFI\xfb\x00\x00\x00\x03"),
	} {
		if got := Detect(body); got != codec {
			t.Errorf("Detect(%q...) = %q, want %q", body[:4], got, codec)
		}
	}
	if got := Detect([]byte{0x1f}); got != None {
		t.Errorf("half a gzip magic number detected as %q", got)
	}
}

func TestKeyForExtensionStripsOnlyTheSuffixOfTheCodecFound(t *testing.T) {
	for _, tc := range []struct {
		key   string
		codec Codec
		want  string
	}{
		{"a.qcow2.xz", XZ, "a.qcow2"},
		{"a.vmdk.GZ", Gzip, "a.vmdk"},
		{"a.img.zst", Zstd, "a.img"},
		{"a.img.zstd", Zstd, "a.img"},
		{"a.qcow2", None, "a.qcow2"},
		{"a.qcow2.xz", Gzip, "a.qcow2.xz"}, // named xz, holds gzip: the name is not trusted
		{"a.vhdx.gz", None, "a.vhdx.gz"},
	} {
		if got := KeyForExtension(tc.key, tc.codec); got != tc.want {
			t.Errorf("KeyForExtension(%q, %q) = %q, want %q", tc.key, tc.codec, got, tc.want)
		}
	}
}

// payload is more than the window cap, so a decoder that kept all of it
// would show; it compresses well, so the test stays fast.
func payload() []byte {
	b := make([]byte, 72<<20)
	for i := 0; i < len(b); i += 4096 {
		b[i] = byte(i >> 12)
	}
	return b
}

func TestStreamsWithinTheWindowCapDecodeWhole(t *testing.T) {
	data := payload()
	want := sha256.Sum256(data)
	for name, body := range map[string][]byte{
		"xz -9 (64 MiB dictionary)": decompresstest.Compressed(t, data, decompresstest.XZWithDict(64<<20)),
		"zstd 8 MiB window": decompresstest.Compressed(t, data, func(w io.Writer) (io.WriteCloser, error) {
			return zstd.NewWriter(w, zstd.WithWindowSize(8<<20))
		}),
	} {
		t.Run(name, func(t *testing.T) {
			r, _, err := NewReader(bufio.NewReader(bytes.NewReader(body)))
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			h := sha256.New()
			if _, err := io.Copy(h, r); err != nil {
				t.Fatalf("decode: %v", err)
			}
			if got := h.Sum(nil); !bytes.Equal(got, want[:]) {
				t.Fatal("decoded bytes differ from the original")
			}
		})
	}
}

func TestStreamDeclaringAHugeWindowIsRefusedByRule(t *testing.T) {
	bigWindow := []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, (28 - 10) << 3, 0x49, 0, 0, 'i', 'm', 'a', 'g', 'e', 'p', 'i', 'p', 'e', 's'}
	for name, body := range map[string][]byte{
		"xz 1 GiB dictionary": decompresstest.Compressed(t, bytes.Repeat([]byte("imagepipe"), 1000), decompresstest.XZWithDict(1<<30)),
		"zstd 256 MiB window": bigWindow,
	} {
		t.Run(name, func(t *testing.T) {
			_, path, err := expand(t, bytes.NewReader(body), Budget{MaxSize: 1 << 40})
			if fe, ok := failure.As(err); !ok || !fe.Permanent || fe.Rule != events.RuleDecompressWindow {
				t.Fatalf("err = %v, want a refusal by rule %s", err, events.RuleDecompressWindow)
			}
			if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the partial file was left behind: %v", err)
			}
		})
	}
}

// allocated is the bytes of disk path takes, holes excluded.
func allocated(t *testing.T, path string) (size, alloc int64) {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Size, st.Blocks * 512
}

func TestAGibibyteOfZerosIsWrittenAsOneHole(t *testing.T) {
	for _, tc := range []struct {
		name string
		size int64
		src  func(n int64) io.Reader
	}{
		{"uncompressed", 1 << 30, func(n int64) io.Reader { return &zeros{n: n} }},
		// Smaller: decoding is slow under the race detector.
		{"zstd", 128 << 20, func(n int64) io.Reader { return bytes.NewReader(decompresstest.ZstdRun(0, n)) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// The disk has 1 MiB of room: zeros must not need any.
			res, path, err := expand(t, tc.src(tc.size), Budget{MaxSize: tc.size, free: constantFree(1 << 20)})
			if err != nil {
				t.Fatal(err)
			}
			size, alloc := allocated(t, path)
			if size != tc.size || res.Size != tc.size || res.Allocated != 0 {
				t.Errorf("file size %d, result %+v; want %d bytes of content, none allocated", size, res, tc.size)
			}
			if alloc > 64<<10 {
				t.Errorf("%d bytes of zeros take %d bytes of disk, want none", tc.size, alloc)
			}
		})
	}
}

func TestDataAndZerosComeOutExactlyAsCompressed(t *testing.T) {
	// Data, a hole, data straddling a block boundary, a hole, a tail
	// shorter than a block and than a page.
	data := make([]byte, 5<<20+1234)
	copy(data[0:], bytes.Repeat([]byte{0xa1}, 3*holeBlock))
	copy(data[3<<20-100:], bytes.Repeat([]byte{0xb2}, 200))
	data[len(data)-1] = 0xc3
	for name, body := range map[string][]byte{
		"uncompressed": data,
		"gzip":         decompresstest.Compressed(t, data, decompresstest.Gzip),
		"xz":           decompresstest.Compressed(t, data, decompresstest.XZWithDict(1<<20)),
	} {
		t.Run(name, func(t *testing.T) {
			res, path, err := expand(t, bytes.NewReader(body), Budget{MaxSize: int64(len(data))})
			if err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Fatal("the file differs from the content")
			}
			// Three blocks, the two around byte 3 MiB, the tail.
			if want := int64(3*holeBlock + 2*holeBlock + 1234); res.Allocated != want || res.Size != int64(len(data)) {
				t.Errorf("result %+v, want %d bytes allocated", res, want)
			}
		})
	}
}

func TestContentPastTheVirtualSizeLimitIsRefusedByRule(t *testing.T) {
	res, path, err := expand(t, bytes.NewReader(decompresstest.ZstdRun(0, 256<<20)), Budget{MaxSize: 64 << 20})
	if fe, ok := failure.As(err); !ok || !fe.Permanent || fe.Rule != events.RuleVirtualSize || fe.Suggestion == "" {
		t.Fatalf("err = %v, want a refusal by rule %s", err, events.RuleVirtualSize)
	}
	if res.Size > 64<<20 || res.Allocated != 0 {
		t.Errorf("result %+v: wrote past the limit, or allocated zeros", res)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the partial file was left behind: %v", err)
	}
}

func TestDataThatCanNeverFitTheScratchSpaceIsRefusedByRule(t *testing.T) {
	const reserve, room = 8 << 20, 24 << 20
	d := &fakeDisk{t: t, capacity: reserve + room, others: func(int) int64 { return 0 }}
	b := Budget{MaxSize: 1 << 40, Reserve: reserve, free: d.free, recheckEvery: 8 << 20}
	for name, src := range map[string]func() io.Reader{
		"uncompressed": func() io.Reader { return &filled{b: 1, n: 64 << 20} },
		// 64 MiB of 0x01 in a few KiB.
		"zstd": func() io.Reader { return bytes.NewReader(decompresstest.ZstdRun(1, 64<<20)) },
	} {
		t.Run(name, func(t *testing.T) {
			res, path, err := expand(t, src(), b)
			fe, ok := failure.As(err)
			if !ok || !fe.Permanent || fe.Rule != events.RuleScratchSpace || fe.Suggestion == "" {
				t.Fatalf("err = %v, want a refusal by rule %s", err, events.RuleScratchSpace)
			}
			if res.Allocated > room || res.Allocated < room-bufSize {
				t.Errorf("allocated %d bytes, want nearly all of the %d of room and no more", res.Allocated, room)
			}
			if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the partial file was left behind: %v", err)
			}
		})
	}
}

func TestFreeSpaceIsLookedAtAgainWhileWriting(t *testing.T) {
	// Room for all of it at first; then other writers fill the disk to
	// 4 MiB short of the reserve. The content would fit the disk without
	// them, so it is retried, not refused.
	const every = 16 << 20
	d := &fakeDisk{t: t, capacity: 1 << 40, others: func(look int) int64 {
		if look == 1 {
			return 0
		}
		return 1<<40 - AutoReserve(1<<40) - every - 4<<20
	}}
	res, _, err := expand(t, &filled{b: 1, n: 256 << 20}, Budget{MaxSize: 1 << 40, Reserve: -1, free: d.free, recheckEvery: every})
	if fe, ok := failure.As(err); !ok || fe.Permanent || fe.Rule != events.RuleScratchSpace {
		t.Fatalf("err = %v, want a retryable failure naming rule %s", err, events.RuleScratchSpace)
	}
	if d.looks < 2 || res.Allocated != every+4<<20 {
		t.Errorf("looked %d times, allocated %d bytes; want a second look after %d bytes and nothing past its 4 MiB", d.looks, res.Allocated, every)
	}
}

func TestShortageThatAnEmptierDiskWouldNotHaveIsRetried(t *testing.T) {
	// A 96 MiB disk. While others hold 64 MiB, 64 MiB of data runs out of
	// room but would fit once they are gone; on the disk to itself,
	// 128 MiB never fits. (A shortage is judged by what is needed when it
	// strikes: content that runs short while others hold room is retried,
	// and refused on the attempt that finds the disk its own.)
	for _, tc := range []struct {
		name      string
		others    int64
		data      int64
		permanent bool
	}{
		{"fits once the others end", 64 << 20, 64 << 20, false},
		{"never fits", 0, 128 << 20, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &fakeDisk{t: t, capacity: 96 << 20, others: func(int) int64 { return tc.others }}
			b := Budget{MaxSize: 1 << 40, free: d.free, recheckEvery: 8 << 20}
			_, _, err := expand(t, &filled{b: 1, n: tc.data}, b)
			fe, ok := failure.As(err)
			if !ok || fe.Permanent != tc.permanent || fe.Rule != events.RuleScratchSpace {
				t.Fatalf("err = %v (permanent %v), want permanent %v naming rule %s", err, ok && fe.Permanent, tc.permanent, events.RuleScratchSpace)
			}
		})
	}
}

func TestAutoReserveIsATwentiethOfTheDiskUpToAGibibyte(t *testing.T) {
	for size, want := range map[int64]int64{320 << 20: 16 << 20, 20 << 30: 1 << 30, 1 << 40: 1 << 30} {
		if got := AutoReserve(size); got != want {
			t.Errorf("AutoReserve(%d) = %d, want %d", size, got, want)
		}
	}
}

func TestDamagedStreamIsRefusedButAFailingSourceIsNot(t *testing.T) {
	body := decompresstest.Compressed(t, bytes.Repeat([]byte("imagepipe disk "), 100000), decompresstest.Gzip)
	_, _, err := expand(t, bytes.NewReader(body[:len(body)/2]), Budget{MaxSize: 1 << 40})
	if fe, ok := failure.As(err); !ok || !fe.Permanent || fe.Rule != events.RuleCompressedStream {
		t.Errorf("truncated gzip: err = %v, want a refusal by rule %s", err, events.RuleCompressedStream)
	}

	dropped := errors.New("connection reset")
	_, _, err = expand(t, io.MultiReader(bytes.NewReader(body[:len(body)/2]), failingReader{dropped}), Budget{MaxSize: 1 << 40})
	if _, ok := failure.As(err); ok || !errors.Is(err, dropped) {
		t.Errorf("source failing: err = %v, want its own error, unclassified", err)
	}
}

type failingReader struct{ err error }

func (f failingReader) Read([]byte) (int, error) { return 0, f.err }

func TestCancelledExpansionStopsAndRemovesItsFile(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	path := filepath.Join(t.TempDir(), "input")
	_, err := Expand(ctx, bytes.NewReader(decompresstest.ZstdRun(1, 1<<30)), path, Budget{})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the partial file was left behind: %v", err)
	}
}
