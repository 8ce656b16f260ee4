//go:build unix && !linux

package minioserver

import "syscall"

// sysProcAttr puts MinIO in a process group of its own, so that Stop
// reaches anything it starts. Only Linux can tie the child's life to
// this process (Pdeathsig); elsewhere a crash here leaves MinIO running.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
