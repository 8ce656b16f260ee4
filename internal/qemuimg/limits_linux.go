//go:build linux && !portable

package qemuimg

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
)

// limitedCommand runs qemu under prlimit, which sets the limits on itself
// and then execs qemu-img, so they are in force before qemu-img reads a
// single byte; setting them from the parent after start would leave a
// window. The kernel enforces them, and its signal names the cause in the
// exit status, so limitHit never has anything to add.
func limitedCommand(ctx context.Context, lim Limits, qemu string, args []string) (cmd *exec.Cmd, limitHit func() error, err error) {
	prlimit, err := exec.LookPath("prlimit")
	if err != nil {
		return nil, nil, fmt.Errorf("prlimit not found, install util-linux (qemu-img is never run without resource limits): %w", err)
	}
	argv := append(lim.prlimitArgs(), "--", qemu)
	argv = append(argv, args...)
	cmd = exec.CommandContext(ctx, prlimit, argv...)
	// Its own process group, killed whole on cancel: nothing qemu-img
	// started outlives it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		if errors.Is(err, syscall.ESRCH) {
			return os.ErrProcessDone
		}
		return err
	}
	return cmd, func() error { return nil }, nil
}
