package qemuimg

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// Limits bounds one qemu-img process. A zero field takes the operation's
// default (see New); a negative one leaves that resource unlimited.
type Limits struct {
	// AddressSpace is RLIMIT_AS in bytes. A hostile header can make
	// qemu-img allocate tables sized by the claimed image, so this is what
	// turns "allocate 40 GiB" into a clean failure instead of an OOM kill of
	// the whole replica.
	AddressSpace int64
	// CPUTime is RLIMIT_CPU, rounded up to whole seconds. Reading metadata
	// should never need much CPU; conversion needs time in proportion to the
	// image, so the caller sizes it or leaves it to the context's deadline.
	CPUTime time.Duration
}

const (
	defaultBinary       = "qemu-img"
	defaultAddressSpace = 1 << 30
	defaultInfoCPU      = 30 * time.Second

	// stderrCap keeps an error message readable in a notification while
	// still holding the line qemu-img prints last, just before it exits.
	stderrCap = 2 << 10
	// infoStdoutCap is far above any honest `info` document but stops an
	// image with a huge snapshot table from growing our heap without bound.
	infoStdoutCap = 16 << 20
	// waitDelay bounds how long Wait lingers for pipes after the process
	// group was killed; nothing else should be holding them.
	waitDelay = 5 * time.Second
	// threadStack is RLIMIT_STACK for qemu-img, ample for its threads.
	threadStack = 2 << 20
)

// Runner runs qemu-img. Its fields may be changed before first use; it is
// safe for concurrent use afterwards.
type Runner struct {
	// Binary is the qemu-img executable, looked up in PATH unless it
	// contains a slash.
	Binary string
	// Limits applies to info and version.
	Limits Limits
	// ConvertLimits applies to convert and check, whose cost grows with the
	// size of the image rather than with its header.
	ConvertLimits Limits
	// DirectIO makes convert read and write with O_DIRECT (-T none -t
	// none), past the page cache. Set it only where the scratch file
	// system supports O_DIRECT (see package scratch): qemu-img fails to
	// open files elsewhere.
	DirectIO bool
	Log      *slog.Logger
}

// New returns a Runner with the defaults: info limited to 1 GiB of address
// space and 30 s of CPU, convert to 1 GiB and no CPU limit (the job's
// deadline bounds it). A nil log discards.
func New(log *slog.Logger) *Runner {
	return &Runner{
		Binary:        defaultBinary,
		Limits:        Limits{AddressSpace: defaultAddressSpace, CPUTime: defaultInfoCPU},
		ConvertLimits: Limits{AddressSpace: defaultAddressSpace},
		Log:           log,
	}
}

func (r *Runner) infoLimits() Limits {
	return r.Limits.withDefaults(Limits{AddressSpace: defaultAddressSpace, CPUTime: defaultInfoCPU})
}

func (r *Runner) convertLimits() Limits {
	return r.ConvertLimits.withDefaults(Limits{AddressSpace: defaultAddressSpace})
}

func (l Limits) withDefaults(d Limits) Limits {
	if l.AddressSpace == 0 {
		l.AddressSpace = d.AddressSpace
	}
	if l.CPUTime == 0 {
		l.CPUTime = d.CPUTime
	}
	return l
}

// prlimitArgs leaves out unlimited resources rather than passing
// "unlimited": raising an inherited hard limit needs privileges we may not
// have, and inheriting it is what "unlimited" means here anyway.
func (l Limits) prlimitArgs() []string {
	var args []string
	if l.AddressSpace > 0 {
		// glibc sizes each thread's default stack by RLIMIT_STACK (8 MiB
		// on most systems), and qemu's I/O thread pool grows with the load
		// on the disk: reserved, untouched stacks would otherwise eat the
		// address-space budget on a busy host.
		args = append(args, "--as="+strconv.FormatInt(l.AddressSpace, 10), "--stack="+strconv.Itoa(threadStack))
	}
	if l.CPUTime > 0 {
		soft := max(int64(math.Ceil(l.CPUTime.Seconds())), 1)
		// The soft limit delivers SIGXCPU, which names the cause in the exit
		// status; the hard limit a second later is the SIGKILL backstop.
		args = append(args, fmt.Sprintf("--cpu=%d:%d", soft, soft+1))
	}
	return args
}

func (r *Runner) logger() *slog.Logger {
	if r.Log != nil {
		return r.Log
	}
	return slog.New(slog.DiscardHandler)
}

// run executes qemu-img with args under lim. It returns ctx.Err() when the
// context ended the process, an *ExitError when qemu-img failed, and a plain
// error when the process could not be started as required.
func (r *Runner) run(ctx context.Context, op string, lim Limits, stdout io.Writer, stderr *tailBuffer, args ...string) error {
	bin := r.Binary
	if bin == "" {
		bin = defaultBinary
	}
	// Resolved here so that the child's PATH cannot pick a different binary.
	qemu, err := exec.LookPath(bin)
	if err != nil {
		return fmt.Errorf("%s not found, install qemu-utils: %w", bin, err)
	}
	cmd, limitHit, err := limitedCommand(ctx, lim, qemu, args)
	if err != nil {
		return err
	}
	// LC_ALL=C keeps messages in English, which ExitError.LimitExceeded
	// relies on; nothing else from our environment (credentials included)
	// has any business in a process parsing hostile input.
	// MALLOC_ARENA_MAX caps glibc's per-thread heaps, 64 MiB of address
	// space each, which count against the limit without being used.
	cmd.Env = []string{"PATH=" + childPath(), "LC_ALL=C", "MALLOC_ARENA_MAX=2"}
	cmd.Stdout = stdout
	cmd.Stderr = stderr
	// Stdin stays nil, which os/exec connects to /dev/null.
	cmd.WaitDelay = waitDelay

	start := time.Now()
	err = cmd.Run()
	limitErr := limitHit()
	r.logger().DebugContext(ctx, "qemu-img finished",
		"op", op, "args", args, "elapsed", time.Since(start), "err", err)
	if err == nil {
		return nil
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return ctxErr
	}
	if limitErr != nil {
		return &ExitError{Op: op, Stderr: stderr.String(), Err: fmt.Errorf("%w (%v)", limitErr, err)}
	}
	var xe *exec.ExitError
	if !errors.As(err, &xe) {
		return err
	}
	msg := stderr.String()
	if strings.HasPrefix(msg, "prlimit:") {
		// prlimit itself failed (limits refused, exec failed): a problem of
		// this host, not of the image, so it must not look like an ExitError.
		return fmt.Errorf("running qemu-img under prlimit: %s (%w)", msg, err)
	}
	return &ExitError{Op: op, Stderr: msg, Err: err}
}

func childPath() string {
	if p := os.Getenv("PATH"); p != "" {
		return p
	}
	return "/usr/sbin:/usr/bin:/sbin:/bin"
}
