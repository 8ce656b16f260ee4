//go:build !linux || portable

package qemuimg

import (
	"context"
	"errors"
	"math"
	"os/exec"
	"time"
)

// limitedCommand runs qemu directly. Without Linux's prlimit there is no
// address-space limit, and the CPU time limit becomes a wall-clock one as
// long as prlimit's hard limit: stricter for a process that waits, the
// same for one that computes. Only the command line runs qemu-img here
// (inspect, judging the user's own files on a workstation); the functions,
// which face uploads from anyone, run on Linux. limitHit, called once the
// command ended, releases the timer and reports errTimeLimit if the limit
// is what ended qemu-img.
func limitedCommand(ctx context.Context, lim Limits, qemu string, args []string) (cmd *exec.Cmd, limitHit func() error, err error) {
	cancel := context.CancelFunc(func() {})
	limited := ctx
	if lim.CPUTime > 0 {
		wall := time.Duration(max(int64(math.Ceil(lim.CPUTime.Seconds())), 1)+1) * time.Second
		limited, cancel = context.WithTimeout(ctx, wall)
	}
	cmd = exec.CommandContext(limited, qemu, args...)
	return cmd, func() error {
		defer cancel()
		if ctx.Err() == nil && errors.Is(limited.Err(), context.DeadlineExceeded) {
			return errTimeLimit
		}
		return nil
	}, nil
}
