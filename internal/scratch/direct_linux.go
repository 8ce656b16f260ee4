//go:build linux && !portable

package scratch

import (
	"errors"
	"os"
	"syscall"
)

// setDirect turns O_DIRECT on or off for an open file.
func setDirect(f *os.File, on bool) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		flags, _, errno := syscall.Syscall(syscall.SYS_FCNTL, fd, syscall.F_GETFL, 0)
		if errno != 0 {
			serr = errno
			return
		}
		if on {
			flags |= syscall.O_DIRECT
		} else {
			flags &^= syscall.O_DIRECT
		}
		if _, _, errno = syscall.Syscall(syscall.SYS_FCNTL, fd, syscall.F_SETFL, flags); errno != 0 {
			serr = errno
		}
	})
	return errors.Join(err, serr)
}

// alignedBuffer maps anonymous memory, which is page aligned; the Go heap
// promises no alignment.
func alignedBuffer(n int) ([]byte, error) {
	return syscall.Mmap(-1, 0, n, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
}

// freeBuffer unmaps a buffer from alignedBuffer.
func freeBuffer(b []byte) error { return syscall.Munmap(b) }

// pread is pread(2), whose bare errno the caller tells apart: EINTR to
// retry, EINVAL for an alignment the file system refuses.
func pread(f *os.File, b []byte, off int64) (int, error) {
	return syscall.Pread(int(f.Fd()), b, off)
}
