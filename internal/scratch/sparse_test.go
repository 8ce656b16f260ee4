package scratch

import (
	"bytes"
	"crypto/sha256"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

// layout is a file size and the [start, end) ranges written with
// non-zero bytes; everything else is left a hole.
type layout struct {
	name   string
	size   int64
	writes [][2]int64
}

var layouts = []layout{
	{"empty", 0, nil},
	{"all hole", 3 << 20, nil},
	{"all data", 1 << 20, [][2]int64{{0, 1 << 20}}},
	{"data at start", 4 << 20, [][2]int64{{0, 100_000}}},
	{"data at end", 4 << 20, [][2]int64{{4<<20 - 5000, 4 << 20}}},
	{"unaligned tail", 4<<20 + 123, [][2]int64{{1 << 20, 1<<20 + 10}, {4 << 20, 4<<20 + 123}}},
	{"scattered", 16 << 20, scattered(16<<20, 200)},
}

func scattered(size int64, n int) [][2]int64 {
	r := rand.New(rand.NewPCG(1, 2))
	var w [][2]int64
	for range n {
		start := r.Int64N(size - 70_000)
		w = append(w, [2]int64{start, start + 1 + r.Int64N(64_000)})
	}
	return w
}

// build writes l into a temp file and returns its path and its bytes.
func build(t *testing.T, l layout) (string, []byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(l.size); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, l.size)
	r := rand.New(rand.NewPCG(3, 4))
	for _, w := range l.writes {
		b := want[w[0]:w[1]]
		for i := range b {
			b[i] = byte(r.IntN(255) + 1)
		}
		if _, err := f.WriteAt(b, w[0]); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return path, want
}

// openLayout builds l and opens it; the file is closed with the test.
func openLayout(t *testing.T, l layout) (*File, []byte) {
	t.Helper()
	path, want := build(t, l)
	f, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f, want
}

func TestReadAtMatchesTheFileByteForByte(t *testing.T) {
	for _, l := range layouts {
		t.Run(l.name, func(t *testing.T) {
			f, want := openLayout(t, l)
			if f.Size() != l.size {
				t.Fatalf("Size() = %d, want %d", f.Size(), l.size)
			}
			got, err := io.ReadAll(io.NewSectionReader(f, 0, f.Size()))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("sequential read differs from the file")
			}
			r := rand.New(rand.NewPCG(5, 6))
			for range 500 {
				if l.size == 0 {
					break
				}
				off := r.Int64N(l.size)
				buf := make([]byte, 1+r.IntN(300_000))
				n, err := f.ReadAt(buf, off)
				wantN := min(int64(len(buf)), l.size-off)
				if int64(n) != wantN {
					t.Fatalf("ReadAt(%d bytes at %d) = %d, want %d", len(buf), off, n, wantN)
				}
				if int64(len(buf)) > wantN && err != io.EOF {
					t.Fatalf("ReadAt past the end: err %v, want io.EOF", err)
				}
				if int64(len(buf)) <= wantN && err != nil {
					t.Fatalf("ReadAt: %v", err)
				}
				if !bytes.Equal(buf[:n], want[off:off+int64(n)]) {
					t.Fatalf("ReadAt(%d bytes at %d) differs from the file", len(buf), off)
				}
			}
		})
	}
}

func TestSectionWriteToHashesLikeTheFile(t *testing.T) {
	for _, l := range layouts {
		t.Run(l.name, func(t *testing.T) {
			f, want := openLayout(t, l)
			// The whole file, and a part starting and ending mid-extent.
			for _, r := range [][2]int64{{0, l.size}, {l.size / 3, l.size / 2}} {
				h := sha256.New()
				n, err := io.Copy(h, f.Section(r[0], r[1]))
				if err != nil || n != r[1] {
					t.Fatalf("copied %d bytes, err %v; want %d", n, err, r[1])
				}
				if got, want := h.Sum(nil), sha256.Sum256(want[r[0]:r[0]+r[1]]); !bytes.Equal(got, want[:]) {
					t.Fatalf("section %v: sha256 %x, want %x", r, got, want)
				}
			}
		})
	}
}

func TestSectionReadReadsLikeTheFile(t *testing.T) {
	for _, l := range layouts {
		t.Run(l.name, func(t *testing.T) {
			f, want := openLayout(t, l)
			off, n := l.size/5, l.size-l.size/5-7
			if n < 0 {
				off, n = 0, l.size
			}
			// iotest.OneByteReader would take too long; ReadAll reads in
			// growing chunks, none aligned to an extent.
			got, err := io.ReadAll(struct{ io.Reader }{f.Section(off, n)})
			if err != nil || !bytes.Equal(got, want[off:off+n]) {
				t.Fatalf("section [%d, +%d) read %d bytes (err %v) that differ from the file", off, n, len(got), err)
			}
		})
	}
}

func TestHolesAreNotCountedAsData(t *testing.T) {
	f, _ := openLayout(t, layout{size: 64 << 20, writes: [][2]int64{{8 << 20, 9 << 20}}})
	if !mapsHoles {
		if got := f.DataBytes(); got != 64<<20 {
			t.Fatalf("DataBytes() = %d where holes are not mapped, want the whole file, %d", got, 64<<20)
		}
		return
	}
	// ext4 and tmpfs allocate in 4 KiB blocks; a megabyte written is a
	// megabyte mapped, give or take a block at each end.
	if got := f.DataBytes(); got < 1<<20 || got > 1<<20+8192 {
		t.Fatalf("DataBytes() = %d, want about 1 MiB of a 64 MiB file", got)
	}
}

func TestExtentLimitReadsTheRestAsData(t *testing.T) {
	l := layouts[len(layouts)-1]
	path, want := build(t, l)
	raw, err := openDirectReader(path)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	data, err := mapData(raw, l.size, 3)
	if err != nil {
		t.Fatal(err)
	}
	if !mapsHoles {
		// One extent, the whole file, never reaches the cap.
		if len(data) != 1 || data[0] != (extent{0, l.size}) {
			t.Fatalf("map %v where holes are not mapped: want the whole file as one extent", data)
		}
	} else if len(data) != 3 || data[2].end != l.size {
		t.Fatalf("capped map %v: want 3 extents, the last to the end of the file", data)
	}
	f := &File{f: raw, size: l.size, data: data}
	got, err := io.ReadAll(io.NewSectionReader(f, 0, l.size))
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read with a capped map differs from the file (err %v)", err)
	}
}

func TestConcurrentReadersSeeTheSameBytes(t *testing.T) {
	l := layouts[len(layouts)-1]
	f, want := openLayout(t, l)
	const parts = 8
	part := l.size / parts
	var wg sync.WaitGroup
	errs := make(chan string, parts)
	for i := range int64(parts) {
		wg.Go(func() {
			got, err := io.ReadAll(io.NewSectionReader(f, i*part, part))
			if err != nil || !bytes.Equal(got, want[i*part:(i+1)*part]) {
				errs <- "part differs"
			}
		})
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal(e)
	}
}

// BenchmarkHashSparse hashes a fresh 256 MiB file holding 16 MiB of data,
// as convert hashes the output qemu-img has just written.
func BenchmarkHashSparse(b *testing.B) {
	dir := b.TempDir()
	fresh := func(b *testing.B) string {
		b.StopTimer()
		defer b.StartTimer()
		path := filepath.Join(dir, "disk.raw")
		os.Remove(path)
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		f.Truncate(256 << 20)
		f.WriteAt(bytes.Repeat([]byte{1}, 16<<20), 64<<20)
		f.Close()
		return path
	}
	b.Run("os.File", func(b *testing.B) {
		b.SetBytes(256 << 20)
		for range b.N {
			f, err := os.Open(fresh(b))
			if err != nil {
				b.Fatal(err)
			}
			io.Copy(sha256.New(), f)
			f.Close()
		}
	})
	b.Run("sparse.File", func(b *testing.B) {
		b.SetBytes(256 << 20)
		for range b.N {
			f, err := Open(fresh(b))
			if err != nil {
				b.Fatal(err)
			}
			io.Copy(sha256.New(), f.Section(0, f.Size()))
			f.Close()
		}
	})
}
