//go:build unix && (!linux || portable)

package qemuimg

import (
	"context"
	"errors"
	"os/exec"
	"testing"
	"time"
)

func TestRunsQemuImgWhereThereIsNoPrlimit(t *testing.T) {
	requireTools(t)
	p := blankImage(t, t.TempDir(), "disk.qcow2", "qcow2", "3M")
	qemu, err := exec.LookPath("qemu-img")
	if err != nil {
		t.Fatal(err)
	}
	// Nothing but qemu-img itself can be found: no prlimit.
	t.Setenv("PATH", t.TempDir())
	r := New(nil)
	r.Binary = qemu
	info, err := r.Info(context.Background(), p, "qcow2")
	if err != nil {
		t.Fatalf("Info without prlimit: %v", err)
	}
	if info.Format != "qcow2" || info.VirtualSize != 3*mib {
		t.Fatalf("Info = format %q, virtual size %d; want qcow2, %d", info.Format, info.VirtualSize, 3*mib)
	}
}

func TestCPUTimeLimitEndsAHungQemuImgWithoutPrlimit(t *testing.T) {
	requireTools(t)
	t.Parallel()
	src := blockingSource(t)
	r := New(nil)
	r.Limits.CPUTime = time.Millisecond
	_, err := r.Info(context.Background(), src, "raw")
	var ee *ExitError
	if !errors.As(err, &ee) || !ee.LimitExceeded() {
		t.Fatalf("err = %v, want an ExitError with LimitExceeded", err)
	}
	if errors.Is(err, context.DeadlineExceeded) || ee.ExitCode() != -1 {
		t.Errorf("err = %v, exit code %d: want the limit, not a deadline, and no exit status of its own", err, ee.ExitCode())
	}
	if pids := processesWith(t, src); len(pids) != 0 {
		t.Fatalf("qemu-img still running after its limit: pids %v", pids)
	}
}
