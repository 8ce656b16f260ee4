package minioserver

import "syscall"

// sysProcAttr puts MinIO in a process group of its own, so that Stop
// reaches anything it starts, and has the kernel kill it if this process
// dies first: a crashed test or `imagepipe dev` leaves no server behind.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

// nodeRelativePath is an absolute path, as MinIO wants for a queue
// directory, that names rel under each process's own working directory.
func nodeRelativePath(rel string) (string, error) {
	return "/proc/self/cwd/" + rel, nil
}
