//go:build unix

package qemuimg

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

const mib = 1 << 20

func requireTools(t *testing.T) {
	t.Helper()
	for _, bin := range []string{"qemu-img", "qemu-io", "prlimit"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s not found: install qemu-utils and util-linux", bin)
		}
	}
}

// parallelToolDir marks a test that runs the tools as parallel and gives it
// a directory of its own for its images.
func parallelToolDir(t *testing.T) string {
	t.Helper()
	requireTools(t)
	t.Parallel()
	return t.TempDir()
}

// sh runs a helper command that builds a fixture, independently of the
// code under test.
func sh(t *testing.T, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

func sha256File(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// blankImage is an image of format and virtual size with nothing written,
// at dir/name.
func blankImage(t *testing.T, dir, name, format, size string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	sh(t, "qemu-img", "create", "-q", "-f", format, p, size)
	return p
}

// patternedQcow2 is a 4 MiB qcow2 with 0x5a in its first MiB, 0xa5 in
// [3 MiB, 3.5 MiB) and nothing allocated elsewhere.
func patternedQcow2(t *testing.T, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "src.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "4M")
	sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 3M 512k", p)
	return p
}

func TestInfoReportsFormatAndVirtualSize(t *testing.T) {
	requireTools(t)
	tests := []struct {
		format string
		opts   []string
	}{
		{"qcow2", nil},
		{"vhdx", nil},
		// Without force_size, vpc rounds the size to a CHS geometry.
		{"vpc", []string{"-o", "force_size=on"}},
		{"vmdk", nil},
		{"vmdk", []string{"-o", "subformat=streamOptimized"}},
		{"vdi", nil},
		{"raw", nil},
	}
	for _, tt := range tests {
		t.Run(tt.format+strings.Join(tt.opts, ""), func(t *testing.T) {
			t.Parallel()
			p := filepath.Join(t.TempDir(), "disk."+tt.format)
			args := append([]string{"create", "-q", "-f", tt.format}, tt.opts...)
			sh(t, "qemu-img", append(args, p, "64M")...)

			res, err := New(nil).Info(context.Background(), p, tt.format)
			if err != nil {
				t.Fatal(err)
			}
			if res.Format != tt.format || res.VirtualSize != 64*mib {
				t.Errorf("format %q, virtual size %d; want %q, %d", res.Format, res.VirtualSize, tt.format, 64*mib)
			}
			if res.BackingFilename != "" || res.DirtyFlag {
				t.Errorf("backing %q, dirty %v on a fresh image", res.BackingFilename, res.DirtyFlag)
			}
			var doc map[string]any
			if err := json.Unmarshal(res.JSON, &doc); err != nil || doc["virtual-size"] == nil {
				t.Errorf("raw JSON not usable (%v): %s", err, res.JSON)
			}
		})
	}
}

func TestInfoReportsBackingFileWithoutOpeningIt(t *testing.T) {
	dir := parallelToolDir(t)
	p := filepath.Join(dir, "top.qcow2")
	backing := filepath.Join(dir, "no-such-dir", "base.raw")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", p, "64M")

	res, err := New(nil).Info(context.Background(), p, "qcow2")
	if err != nil {
		t.Fatal(err)
	}
	if res.BackingFilename != backing {
		t.Fatalf("backing filename %q, want %q", res.BackingFilename, backing)
	}
}

func TestInfoAcceptsColonAfterFirstSlash(t *testing.T) {
	requireTools(t)
	t.Parallel()
	p := blankImage(t, t.TempDir(), "win11:disk.qcow2", "qcow2", "1M")
	if _, err := New(nil).Info(context.Background(), p, "qcow2"); err != nil {
		t.Fatal(err)
	}
}

func TestInfoWithWrongFormatIsExitError(t *testing.T) {
	requireTools(t)
	t.Parallel()
	p := blankImage(t, t.TempDir(), "disk.raw", "raw", "1M")

	_, err := New(nil).Info(context.Background(), p, "qcow2")
	var ee *ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("err = %v, want *ExitError", err)
	}
	if ee.Op != "info" || ee.ExitCode() != 1 || ee.LimitExceeded() {
		t.Errorf("op %q, exit %d, limit %v", ee.Op, ee.ExitCode(), ee.LimitExceeded())
	}
	if !strings.Contains(ee.Stderr, "qcow2") || !strings.Contains(err.Error(), p) {
		t.Errorf("error does not explain itself: %v", err)
	}
	if strings.HasPrefix(ee.Stderr, "qemu-img:") {
		t.Errorf("stderr keeps the redundant prefix: %q", ee.Stderr)
	}
}

func TestConvertQcow2ToRaw(t *testing.T) {
	dir := parallelToolDir(t)
	src := patternedQcow2(t, dir)
	ref := filepath.Join(dir, "ref.raw")
	sh(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", src, ref)
	for _, directIO := range []bool{false, true} {
		t.Run(fmt.Sprintf("DirectIO=%v", directIO), func(t *testing.T) {
			testConvertQcow2ToRaw(t, src, ref, directIO)
		})
	}
}

func testConvertQcow2ToRaw(t *testing.T, src, ref string, directIO bool) {
	dst := filepath.Join(t.TempDir(), "out.raw")
	r := New(nil)
	r.DirectIO = directIO
	var progress []float64
	err := r.Convert(context.Background(), src, "qcow2", dst, "raw", func(p float64) {
		progress = append(progress, p)
	})
	if err != nil {
		t.Fatal(err)
	}

	if sha256File(t, dst) != sha256File(t, ref) {
		t.Error("output differs from a plain qemu-img convert")
	}
	b, err := os.ReadFile(dst)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		off  int
		want byte
	}{
		{0, 0x5a}, {mib - 1, 0x5a}, {mib, 0}, {3*mib - 1, 0},
		{3 * mib, 0xa5}, {3*mib + mib/2 - 1, 0xa5}, {3*mib + mib/2, 0}, {4*mib - 1, 0},
	} {
		if b[c.off] != c.want {
			t.Errorf("byte at %d = %#x, want %#x", c.off, b[c.off], c.want)
		}
	}
	fi, err := os.Stat(dst)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() != 4*mib {
		t.Errorf("output size %d, want the virtual size %d", fi.Size(), 4*mib)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Blocks*512 >= fi.Size() {
		t.Errorf("output is not sparse: %d bytes allocated for %d", st.Blocks*512, fi.Size())
	}

	if len(progress) == 0 || progress[len(progress)-1] != 100 {
		t.Fatalf("progress %v does not end at 100", progress)
	}
	for i := 1; i < len(progress); i++ {
		if progress[i] <= progress[i-1] {
			t.Fatalf("progress %v is not increasing", progress)
		}
	}
}

func TestConvertToQcow2PassesCheckAndRoundTrips(t *testing.T) {
	dir := parallelToolDir(t)
	src := patternedQcow2(t, dir)
	ref := filepath.Join(dir, "ref.raw")
	sh(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", src, ref)
	r := New(nil)
	ctx := context.Background()

	q := filepath.Join(dir, "out.qcow2")
	if err := r.Convert(ctx, ref, "raw", q, "qcow2", nil); err != nil {
		t.Fatal(err)
	}
	res, err := r.Info(ctx, q, "qcow2")
	if err != nil {
		t.Fatal(err)
	}
	if res.Format != "qcow2" || res.VirtualSize != 4*mib {
		t.Errorf("format %q, virtual size %d", res.Format, res.VirtualSize)
	}
	if err := r.Check(ctx, q, "qcow2"); err != nil {
		t.Errorf("check of fresh output: %v", err)
	}
	back := filepath.Join(dir, "back.raw")
	if err := r.Convert(ctx, q, "qcow2", back, "raw", nil); err != nil {
		t.Fatal(err)
	}
	if sha256File(t, back) != sha256File(t, ref) {
		t.Error("raw → qcow2 → raw changed the data")
	}
}

func TestConvertReportsQemuImgError(t *testing.T) {
	dir := parallelToolDir(t)
	src := filepath.Join(dir, "disk.raw")
	sh(t, "qemu-img", "create", "-q", "-f", "raw", src, "1M")

	var progress []float64
	err := New(nil).Convert(context.Background(), src, "vhdx", filepath.Join(dir, "out.raw"), "raw",
		func(p float64) { progress = append(progress, p) })
	var ee *ExitError
	if !errors.As(err, &ee) || ee.Op != "convert" || ee.ExitCode() != 1 {
		t.Fatalf("err = %v, want convert ExitError with status 1", err)
	}
	if !strings.Contains(err.Error(), src) || ee.Stderr == "" {
		t.Errorf("error does not explain itself: %v", err)
	}
	for _, p := range progress {
		if p == 100 {
			t.Errorf("failed conversion reported 100%%: %v", progress)
		}
	}
}

func TestCheckFindsCorruptRefcounts(t *testing.T) {
	dir := parallelToolDir(t)
	p := patternedQcow2(t, dir)
	zeroFirstRefcountBlock(t, p)

	err := New(nil).Check(context.Background(), p, "qcow2")
	var ee *ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 {
		t.Fatalf("err = %v, want check ExitError with status 2", err)
	}
	if !strings.Contains(ee.Stderr, "errors were found") {
		t.Errorf("summary missing from %q", ee.Stderr)
	}
}

// zeroFirstRefcountBlock makes every allocated cluster of a qcow2 look
// free, which `qemu-img check` reports as corruption.
func zeroFirstRefcountBlock(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	hdr := make([]byte, 56)
	if _, err := f.ReadAt(hdr, 0); err != nil {
		t.Fatal(err)
	}
	clusterBits := binary.BigEndian.Uint32(hdr[20:24])
	tableOff := binary.BigEndian.Uint64(hdr[48:56])
	entry := make([]byte, 8)
	if _, err := f.ReadAt(entry, int64(tableOff)); err != nil {
		t.Fatal(err)
	}
	blockOff := binary.BigEndian.Uint64(entry)
	if _, err := f.WriteAt(make([]byte, 1<<clusterBits), int64(blockOff)); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestCheckSkipsFormatsWithoutCheck(t *testing.T) {
	dir := parallelToolDir(t)
	for _, format := range []string{"raw", "vpc"} {
		p := blankImage(t, dir, "disk."+format, format, "1M")
		if err := New(nil).Check(context.Background(), p, format); err != nil {
			t.Errorf("%s: %v", format, err)
		}
	}
}

// processesWith lists the pids whose command line mentions s.
func processesWith(t *testing.T, s string) []string {
	t.Helper()
	cmdlines, err := filepath.Glob("/proc/[0-9]*/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	var pids []string
	for _, c := range cmdlines {
		b, err := os.ReadFile(c)
		if err == nil && bytes.Contains(b, []byte(s)) {
			pids = append(pids, filepath.Base(filepath.Dir(c)))
		}
	}
	return pids
}

// blockingSource is a FIFO without a writer: qemu-img blocks opening it
// until it is killed, which stands in for any hang.
func blockingSource(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "stuck.raw")
	if err := syscall.Mkfifo(p, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConvertCancelKillsQemuImg(t *testing.T) {
	requireTools(t)
	t.Parallel()
	src := blockingSource(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- New(nil).Convert(ctx, src, "raw", filepath.Join(t.TempDir(), "out.raw"), "raw", nil)
	}()

	deadline := time.Now().Add(5 * time.Second)
	for len(processesWith(t, src)) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("qemu-img never started")
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancelled := time.Now()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("err = %v, want context.Canceled", err)
		}
		if d := time.Since(cancelled); d > 5*time.Second {
			t.Fatalf("returned %v after cancel", d)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Convert did not return within 5 s of cancel")
	}
	if pids := processesWith(t, src); len(pids) != 0 {
		t.Fatalf("qemu-img still running after cancel: pids %v", pids)
	}
}

func TestInfoDeadlineKillsQemuImg(t *testing.T) {
	requireTools(t)
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := New(nil).Info(ctx, blockingSource(t), "raw")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want context.DeadlineExceeded", err)
	}
}

// neverRuns is a runner whose qemu-img does not exist: were anything run,
// the error would be "not found" instead of the refusal a test expects.
func neverRuns() *Runner {
	r := New(nil)
	r.Binary = "/nonexistent/qemu-img"
	return r
}

func TestRefusesUnsafePathsWithoutRunningQemuImg(t *testing.T) {
	t.Parallel()
	ok := filepath.Join(t.TempDir(), "disk.qcow2")
	r := neverRuns()
	ctx := context.Background()
	for _, p := range []string{
		`json:{"driver":"file","filename":"/etc/shadow"}`,
		"json:{}",
		"nbd:127.0.0.1:10809",
		"nbd://127.0.0.1/export",
		"http://example.com/disk.qcow2",
		"file:/etc/passwd",
		"ssh://host/disk",
		"disk:1",
		"-o",
		"--help",
		"",
		"disk\x00.qcow2",
	} {
		if _, err := r.Info(ctx, p, "qcow2"); !errors.Is(err, ErrUnsafePath) {
			t.Errorf("Info(%q): %v", p, err)
		}
		if err := r.Convert(ctx, p, "qcow2", ok, "raw", nil); !errors.Is(err, ErrUnsafePath) {
			t.Errorf("Convert from %q: %v", p, err)
		}
		if err := r.Convert(ctx, ok, "qcow2", p, "raw", nil); !errors.Is(err, ErrUnsafePath) {
			t.Errorf("Convert to %q: %v", p, err)
		}
		if err := r.Check(ctx, p, "qcow2"); !errors.Is(err, ErrUnsafePath) {
			t.Errorf("Check(%q): %v", p, err)
		}
	}
}

func TestRefusesDriversThatAreNotImageFormats(t *testing.T) {
	t.Parallel()
	p := filepath.Join(t.TempDir(), "disk")
	r := neverRuns()
	ctx := context.Background()
	for _, f := range []string{"", "vvfat", "blkdebug", "nbd", "file", "QCOW2", "raw,file.filename=/etc/shadow"} {
		if _, err := r.Info(ctx, p, f); !errors.Is(err, ErrUnsupportedFormat) {
			t.Errorf("Info as %q: %v", f, err)
		}
		if err := r.Convert(ctx, p, "raw", p+".out", f, nil); !errors.Is(err, ErrUnsupportedFormat) {
			t.Errorf("Convert to %q: %v", f, err)
		}
	}
}

func TestVersion(t *testing.T) {
	requireTools(t)
	t.Parallel()
	v, err := New(nil).Version(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !regexp.MustCompile(`^\d+\.\d+`).MatchString(v) {
		t.Fatalf("version %q", v)
	}
}

func TestLimitExceededBySignal(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		sig  syscall.Signal
		want bool
	}{
		{syscall.SIGXCPU, true},
		{syscall.SIGKILL, true},
		{syscall.SIGTERM, false},
	} {
		// Only the wait status matters here, and qemu-img offers no quick way
		// to burn CPU, so a sleeping process receives the signal.
		cmd := exec.Command("sleep", "10")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if err := cmd.Process.Signal(tt.sig); err != nil {
			t.Fatal(err)
		}
		e := &ExitError{Op: "convert", Err: cmd.Wait()}
		if got := e.LimitExceeded(); got != tt.want || e.ExitCode() != -1 {
			t.Errorf("%v: LimitExceeded %v, ExitCode %d", tt.sig, got, e.ExitCode())
		}
	}
}

func TestStderrIsCappedAndCleaned(t *testing.T) {
	t.Parallel()
	b := newTailBuffer(stderrCap)
	for range 100 {
		b.Write([]byte("noise noise noise noise noise noise noise noise noise noise\n"))
	}
	b.Write([]byte("qemu-img: Could not open '/scratch/job/in': \x1b[31mbad\x1b[0m\r\n"))
	s := b.String()
	if len(s) > stderrCap+len("…") {
		t.Errorf("kept %d bytes", len(s))
	}
	if !strings.HasPrefix(s, "…") || !strings.HasSuffix(s, "Could not open '/scratch/job/in': \uFFFD[31mbad\uFFFD[0m") {
		t.Errorf("got %q", s)
	}
}

// Measure bounds the scratch space a conversion takes: for each input
// format, the raw and the qcow2 output of an 8 GiB image holding 1.5 MiB
// take no more disk than it says, and it says little more than the data
// where qemu-img sees the image's allocation.
func TestMeasureBoundsWhatAConversionWrites(t *testing.T) {
	for _, tt := range []struct {
		format string
		opts   []string
		// blind: qemu-img's driver reports no allocation (VHDX in
		// qemu-img 7.2), so every byte counts.
		blind bool
	}{
		{"qcow2", nil, false},
		{"vhdx", nil, true},
		{"vpc", []string{"-o", "force_size=on"}, false},
		{"vmdk", nil, false},
		{"vmdk", []string{"-o", "subformat=streamOptimized"}, false},
		{"vdi", nil, false},
		{"raw", nil, false},
	} {
		t.Run(tt.format+strings.Join(tt.opts, ""), func(t *testing.T) {
			dir := parallelToolDir(t)
			src := filepath.Join(dir, "src.qcow2")
			sh(t, "qemu-img", "create", "-q", "-f", "qcow2", src, "8G")
			sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0xa5 3G 512k", "-c", "write -P 1 8191M 4k", src)
			in := filepath.Join(dir, "in."+tt.format)
			sh(t, "qemu-img", append(append([]string{"convert", "-f", "qcow2", "-O", tt.format}, tt.opts...), src, in)...)

			r := New(nil)
			need, err := r.Measure(context.Background(), in, tt.format)
			if err != nil {
				t.Fatal(err)
			}
			const data = mib + mib/2 + 4<<10
			// The slack is qcow2's tables for 8 GiB and a format's block
			// granularity (VHDX and VDI allocate 1 or 2 MiB at a time).
			switch {
			case tt.blind && need < 8<<30:
				t.Errorf("measure says %d bytes for an image whose allocation qemu-img cannot see, want at least its 8 GiB", need)
			case !tt.blind && (need < data || need > data+16*mib):
				t.Errorf("measure says %d bytes for %d of data in 8 GiB", need, data)
			}
			for _, out := range []string{"raw", "qcow2"} {
				dst := filepath.Join(dir, "out."+out)
				if err := r.Convert(context.Background(), in, tt.format, dst, out, nil); err != nil {
					t.Fatal(err)
				}
				fi, err := os.Stat(dst)
				if err != nil {
					t.Fatal(err)
				}
				if used := fi.Sys().(*syscall.Stat_t).Blocks * 512; used > need {
					t.Errorf("the %s output takes %d bytes of disk, more than the %d measured", out, used, need)
				}
			}
		})
	}
}

func TestMeasureOfAnImageQemuImgCannotReadIsExitError(t *testing.T) {
	dir := parallelToolDir(t)
	p := filepath.Join(dir, "not.qcow2")
	if err := os.WriteFile(p, bytes.Repeat([]byte("x"), 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := New(nil).Measure(context.Background(), p, "qcow2")
	var ee *ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("err = %v, want an *ExitError", err)
	}
	if _, err := New(nil).Measure(context.Background(), "json:{}", "qcow2"); !errors.Is(err, ErrUnsafePath) {
		t.Fatalf("err = %v, want ErrUnsafePath", err)
	}
}
