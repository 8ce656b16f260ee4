package qemuimg

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"
)

// formats are the image formats imagepipe reads and writes. qemu-img's -f
// takes any block driver, and several (vvfat, blkdebug, nbd, file, ...)
// open things other than the image, so only these are ever passed.
var formats = map[string]bool{
	"raw": true, "qcow2": true, "vmdk": true, "vhdx": true, "vpc": true, "vdi": true,
}

// checkable are the formats among formats that `qemu-img check` supports.
var checkable = map[string]bool{
	"qcow2": true, "vmdk": true, "vhdx": true, "vdi": true,
}

// progressInterval keeps progress reports to about four a second, which
// is plenty for a human watching and cheap for whoever publishes them.
const progressInterval = 250 * time.Millisecond

// InfoResult is what `qemu-img info` said about an image. JSON is the
// document exactly as printed, for an inspector that needs more than the
// summary.
type InfoResult struct {
	JSON            []byte `json:"-"`
	Format          string `json:"format"`
	VirtualSize     int64  `json:"virtual-size"`
	ActualSize      int64  `json:"actual-size"`
	BackingFilename string `json:"backing-filename"`
	DirtyFlag       bool   `json:"dirty-flag"`
}

// Info runs `qemu-img info` on path read as format. It never lets qemu-img
// probe the format and, like qemu-img info without --backing-chain, does
// not open a backing file; a backing file shows up in BackingFilename for
// the caller to refuse.
func (r *Runner) Info(ctx context.Context, path, format string) (InfoResult, error) {
	if err := checkArgs(path, format); err != nil {
		return InfoResult{}, fmt.Errorf("qemu-img info %s: %w", path, err)
	}
	stdout := &headBuffer{max: infoStdoutCap}
	// --force-share: a read-only look needs no write lock, and must not fail
	// because a previous, killed attempt still appears to hold one.
	err := r.run(ctx, "info", r.infoLimits(), stdout, newTailBuffer(stderrCap),
		"info", "--output=json", "-f", format, "--force-share", "--", path)
	if err == nil && stdout.overflow {
		err = &ExitError{Op: "info", Err: fmt.Errorf("%w of %d bytes", ErrOutputLimit, infoStdoutCap)}
	}
	if err != nil {
		return InfoResult{}, fmt.Errorf("qemu-img info %s: %w", path, err)
	}
	var res InfoResult
	if err := json.Unmarshal(stdout.b, &res); err != nil {
		return InfoResult{}, fmt.Errorf("qemu-img info %s: decoding output: %w", path, err)
	}
	res.JSON = stdout.b
	return res, nil
}

// Measure returns how many bytes converting path (read as format) can
// write at most: `qemu-img measure`'s required size for a qcow2 output,
// which counts every cluster the image has data in (zeros included where
// the image stores them) and qcow2's own tables. A raw output written with
// -S, or to an NBD export, stores no more than that data. Like convert, it
// walks the image's allocation, so its cost grows with the image and it
// runs under the convert limits.
func (r *Runner) Measure(ctx context.Context, path, format string) (int64, error) {
	if err := checkArgs(path, format); err != nil {
		return 0, fmt.Errorf("qemu-img measure %s: %w", path, err)
	}
	stdout := &headBuffer{max: stderrCap}
	err := r.run(ctx, "measure", r.convertLimits(), stdout, newTailBuffer(stderrCap),
		"measure", "--output=json", "-O", "qcow2", "-f", format, "--", path)
	if err != nil {
		return 0, fmt.Errorf("qemu-img measure %s: %w", path, err)
	}
	var res struct {
		Required *int64 `json:"required"`
	}
	if err := json.Unmarshal(stdout.b, &res); err != nil || stdout.overflow || res.Required == nil || *res.Required < 0 {
		return 0, fmt.Errorf("qemu-img measure %s: no required size in %q", path, cleanText(string(stdout.b)))
	}
	return *res.Required, nil
}

// CacheArgs are convert's cache modes for its scratch source and output.
// Both files are read once and deleted. With O_DIRECT (directIO) they stay
// out of the page cache. Without it, -t unsafe at least skips the closing
// fsync of the output, which cost seconds per GiB of data on a rotational
// disk and bought nothing: after a crash the job starts over and the sweep
// removes the file.
func CacheArgs(directIO bool) []string {
	if directIO {
		return []string{"-T", "none", "-t", "none"}
	}
	return []string{"-t", "unsafe"}
}

// Convert runs `qemu-img convert` from src (read as srcFormat) to dst
// (written as dstFormat). onProgress, if not nil, gets increasing
// percentages at most about four times a second and, on success only,
// exactly one final 100. It is called from another goroutine, never
// concurrently, and must return quickly: qemu-img waits while it runs.
func (r *Runner) Convert(ctx context.Context, src, srcFormat, dst, dstFormat string, onProgress func(percent float64)) error {
	if err := checkArgs(src, srcFormat); err != nil {
		return fmt.Errorf("qemu-img convert %s: %w", src, err)
	}
	if err := checkArgs(dst, dstFormat); err != nil {
		return fmt.Errorf("qemu-img convert %s to %s: %w", src, dst, err)
	}
	args := append([]string{"convert", "-p"}, CacheArgs(r.DirectIO)...)
	args = append(args, "-f", srcFormat, "-O", dstFormat)
	if dstFormat == "raw" {
		// Explicit rather than relying on the default: runs of zeroes must
		// become holes, or a mostly empty 1 TB disk costs 1 TB of scratch.
		args = append(args, "-S", "4k")
	}
	args = append(args, "--", src, dst)
	return r.convert(ctx, src, args, onProgress)
}

// ConvertToNBD runs `qemu-img convert` from src (read as srcFormat) to a
// raw image served over NBD on the Unix socket at socket, whose export
// must read as zeros and be the image's virtual size. qemu-img then
// writes in order, one request at a time, and never writes a run of zeros
// (-n --target-is-zero), which is what lets the server pass each write on
// as it comes. onProgress is as for Convert.
func (r *Runner) ConvertToNBD(ctx context.Context, src, srcFormat, socket string, onProgress func(percent float64)) error {
	if err := checkArgs(src, srcFormat); err != nil {
		return fmt.Errorf("qemu-img convert %s: %w", src, err)
	}
	if !strings.HasPrefix(socket, "/") || strings.ContainsRune(socket, 0) {
		return fmt.Errorf("qemu-img convert %s: %w: socket %q", src, ErrUnsafePath, socket)
	}
	args := []string{"convert", "-p"}
	if r.DirectIO {
		args = append(args, "-T", "none")
	}
	// The target's cache mode only decides whether qemu-img sends a
	// flush, which the server has no use for.
	args = append(args, "-t", "unsafe", "-n", "--target-is-zero", "-S", "4k", "-f", srcFormat,
		// Options rather than an nbd+unix:// URI, which would need the
		// path escaped: here only a comma needs doubling.
		"--target-image-opts", "--", src,
		"driver=raw,file.driver=nbd,file.server.type=unix,file.server.path="+strings.ReplaceAll(socket, ",", ",,"))
	return r.convert(ctx, src, args, onProgress)
}

func (r *Runner) convert(ctx context.Context, src string, args []string, onProgress func(percent float64)) error {
	last, lastAt := -1.0, time.Time{}
	stdout := &progressWriter{emit: func(v float64) {
		// 100 is held back: qemu-img prints it before it has flushed and
		// closed the output, and a failure can still follow.
		if onProgress == nil || v >= 100 || v <= last {
			return
		}
		now := time.Now()
		if last >= 0 && now.Sub(lastAt) < progressInterval {
			return
		}
		last, lastAt = v, now
		onProgress(v)
	}}
	if err := r.run(ctx, "convert", r.convertLimits(), stdout, newTailBuffer(stderrCap), args...); err != nil {
		return fmt.Errorf("qemu-img convert %s: %w", src, err)
	}
	if onProgress != nil {
		onProgress(100)
	}
	return nil
}

// Check runs `qemu-img check` (never repairing) on path read as format, and
// returns nil for formats qemu-img cannot check (raw, vpc). Leaked clusters
// are wasted space, not damage, and pass. Like convert, check opens a
// backing file if the image names one: use it on images already inspected,
// such as a conversion's output.
func (r *Runner) Check(ctx context.Context, path, format string) error {
	if err := checkArgs(path, format); err != nil {
		return fmt.Errorf("qemu-img check %s: %w", path, err)
	}
	if !checkable[format] {
		return nil
	}
	// The damage report goes partly to stdout and partly to stderr; one
	// buffer keeps them in order and the summary, printed last, in view.
	out := newTailBuffer(stderrCap)
	err := r.run(ctx, "check", r.convertLimits(), out, out,
		"check", "-f", format, "--force-share", "--", path)
	var ee *ExitError
	if errors.As(err, &ee) {
		switch ee.ExitCode() {
		case checkLeaksOnly, checkNotSupported:
			return nil
		}
	}
	if err != nil {
		return fmt.Errorf("qemu-img check %s: %w", path, err)
	}
	return nil
}

// Exit statuses of qemu-img check other than 0.
const (
	checkLeaksOnly    = 3
	checkNotSupported = 63
)

var versionRE = regexp.MustCompile(`version (\d+\.\d+(?:\.\d+)?)`)

// Version returns qemu-img's version, such as "7.2.0".
func (r *Runner) Version(ctx context.Context) (string, error) {
	stdout := &headBuffer{max: stderrCap}
	err := r.run(ctx, "version", r.infoLimits(), stdout, newTailBuffer(stderrCap), "--version")
	if err != nil {
		return "", fmt.Errorf("qemu-img --version: %w", err)
	}
	m := versionRE.FindSubmatch(stdout.b)
	if m == nil {
		return "", fmt.Errorf("qemu-img --version: no version in %q", cleanText(string(stdout.b)))
	}
	return string(m[1]), nil
}

// checkArgs refuses what would let qemu-img open something other than the
// named local file in the named format.
func checkArgs(path, format string) error {
	if !formats[format] {
		return fmt.Errorf("%w: %q", ErrUnsupportedFormat, format)
	}
	return checkPath(path)
}

// checkPath mirrors how qemu-img reads a file name: "json:" introduces a
// full block-device specification (which can name any file or server), and
// a colon before the first slash selects a protocol driver ("nbd:",
// "http:", "file:"). A path starting with "/" or "./" is always a plain
// file. The leading "-" check is belt and braces behind the "--" that ends
// qemu-img's options.
func checkPath(path string) error {
	switch {
	case path == "",
		strings.HasPrefix(path, "json:"),
		strings.HasPrefix(path, "-"),
		strings.ContainsRune(path, 0):
		return fmt.Errorf("%w: %q", ErrUnsafePath, path)
	}
	if colon := strings.IndexByte(path, ':'); colon >= 0 {
		if slash := strings.IndexByte(path, '/'); slash < 0 || colon < slash {
			return fmt.Errorf("%w: %q", ErrUnsafePath, path)
		}
	}
	return nil
}
