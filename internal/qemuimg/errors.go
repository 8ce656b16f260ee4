package qemuimg

import (
	"errors"
	"os/exec"
	"strings"
	"syscall"
	"unicode"
	"unicode/utf8"
)

var (
	// ErrUnsafePath is returned, before anything runs, for a path qemu-img
	// would not read as a plain file name: a "json:" specification, a
	// protocol prefix such as "nbd:" or "http:", or something that looks
	// like an option.
	ErrUnsafePath = errors.New("path is not a plain file name")
	// ErrUnsupportedFormat is returned, before anything runs, for a format
	// that is not a disk image format: driver names such as "vvfat" or
	// "blkdebug" would let qemu-img read directories or configuration files.
	ErrUnsupportedFormat = errors.New("unsupported image format")
	// ErrOutputLimit means qemu-img printed more than this package buffers.
	ErrOutputLimit = errors.New("qemu-img output exceeds limit")
	// errTimeLimit is qemu-img killed for outliving its CPU time limit,
	// taken as wall-clock time where prlimit is not used.
	errTimeLimit = errors.New("qemu-img ran past its time limit")
)

// ExitError is qemu-img failing. Op is the subcommand ("info", "convert",
// "check", "version"); Stderr is what qemu-img said, trimmed, with control
// characters replaced and cut to about 2 KiB; Err is usually an
// *exec.ExitError.
type ExitError struct {
	Op     string
	Stderr string
	Err    error
}

func (e *ExitError) Error() string {
	if e.Stderr == "" {
		return e.Err.Error()
	}
	return e.Stderr + " (" + e.Err.Error() + ")"
}

func (e *ExitError) Unwrap() error { return e.Err }

// Is makes errors.Is(err, syscall.ENOSPC) hold when qemu-img failed for
// want of room to write its output: the disk was full, not the image
// wrong, and another attempt may well succeed.
func (e *ExitError) Is(target error) bool {
	return target == syscall.ENOSPC && strings.Contains(e.Stderr, "No space left on device")
}

// ExitCode is qemu-img's exit status, or -1 when it was killed by a signal
// or did not exit on its own. Exit status 1 with a message is qemu-img
// refusing the image, which no retry will change.
func (e *ExitError) ExitCode() int {
	var xe *exec.ExitError
	if errors.As(e.Err, &xe) {
		return xe.ExitCode()
	}
	return -1
}

// memoryMessages are how RLIMIT_AS surfaces: it never kills, it makes
// mmap fail, and depending on who was mapping, the dynamic loader, glibc,
// GLib or qemu-img itself reports it and exits or aborts.
var memoryMessages = []string{
	"Cannot allocate memory",
	"failed to map segment",
	"failed to allocate",
	"qemu_thread_create: Resource temporarily unavailable",
	"out of memory",
	"Out of memory",
}

// LimitExceeded reports whether qemu-img hit a resource limit: killed by
// SIGXCPU or SIGKILL (RLIMIT_CPU's soft and hard limits; a cancelled
// context is reported as the context's error instead, so SIGKILL here came
// from the kernel), an allocation failure under RLIMIT_AS, the wall-clock
// stand-in for RLIMIT_CPU where prlimit is not used, or output past what
// this package buffers. An image that needs more than the limits allow
// is refused for good, not retried.
func (e *ExitError) LimitExceeded() bool {
	if errors.Is(e.Err, ErrOutputLimit) || errors.Is(e.Err, errTimeLimit) {
		return true
	}
	var xe *exec.ExitError
	if errors.As(e.Err, &xe) {
		if ws, ok := xe.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			if s := ws.Signal(); s == sigXCPU || s == syscall.SIGKILL {
				return true
			}
		}
	}
	for _, m := range memoryMessages {
		if strings.Contains(e.Stderr, m) {
			return true
		}
	}
	return false
}

// tailBuffer keeps the last max bytes written to it. qemu-img prints the
// message that explains a failure last, right before exiting.
type tailBuffer struct {
	b       []byte
	max     int
	dropped bool
}

func newTailBuffer(max int) *tailBuffer { return &tailBuffer{max: max} }

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.b = append(t.b, p...)
	if over := len(t.b) - t.max; over > 0 {
		t.b = t.b[:copy(t.b, t.b[over:])]
		t.dropped = true
	}
	return len(p), nil
}

// String returns the text fit for an error message that may end up in a
// chat notification: valid UTF-8, no terminal escapes, no redundant
// "qemu-img: " prefixes.
func (t *tailBuffer) String() string {
	s := cleanText(string(t.b))
	if t.dropped && s != "" {
		s = "…" + s
	}
	return s
}

func cleanText(s string) string {
	s = strings.ToValidUTF8(s, string(utf8.RuneError))
	s = strings.Map(func(r rune) rune {
		if r == '\n' || r == '\t' || !unicode.IsControl(r) {
			return r
		}
		if r == '\r' {
			return '\n'
		}
		return utf8.RuneError
	}, s)
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i, l := range lines {
		lines[i] = strings.TrimPrefix(strings.TrimSpace(l), "qemu-img: ")
	}
	return strings.Join(lines, "\n")
}

// headBuffer keeps the first max bytes written to it and remembers whether
// more came, so a caller can refuse truncated output instead of parsing it.
type headBuffer struct {
	b        []byte
	max      int
	overflow bool
}

func (h *headBuffer) Write(p []byte) (int, error) {
	room := h.max - len(h.b)
	if len(p) > room {
		h.b = append(h.b, p[:max(room, 0)]...)
		h.overflow = true
	} else {
		h.b = append(h.b, p...)
	}
	// Always claim the whole write: qemu-img must keep draining into us, or
	// it would block on a full pipe instead of exiting.
	return len(p), nil
}
