//go:build !unix

package minioserver

import (
	"os"
	"syscall"
)

// sysProcAttr has nothing to add where there are no process groups.
func sysProcAttr() *syscall.SysProcAttr { return nil }

// terminate ends MinIO: Windows has no SIGTERM to send a console
// program, so a stop is a kill there, which MinIO's erasure coding and
// the notification queue on disk are built to survive.
func terminate(p *os.Process) { _ = p.Kill() }

// kill ends MinIO at once.
func kill(p *os.Process) { _ = p.Kill() }
