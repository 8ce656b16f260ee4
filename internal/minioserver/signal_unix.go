//go:build unix

package minioserver

import (
	"os"
	"syscall"
)

// terminate asks MinIO's process group to shut down cleanly.
func terminate(p *os.Process) { _ = syscall.Kill(-p.Pid, syscall.SIGTERM) }

// kill ends MinIO's process group at once.
func kill(p *os.Process) { _ = syscall.Kill(-p.Pid, syscall.SIGKILL) }
