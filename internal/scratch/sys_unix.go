//go:build unix

package scratch

import (
	"os"
	"syscall"
)

// DiskSpace is what the file system holding dir has free for an
// unprivileged user, and its size, in bytes.
func DiskSpace(dir string) (free, total int64, err error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, 0, err
	}
	return int64(st.Bavail) * int64(st.Bsize), int64(st.Blocks) * int64(st.Bsize), nil
}

// tryLock takes an exclusive flock(2) on f without waiting; it fails
// while another process holds one.
func tryLock(f *os.File) error {
	return syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
}

// unlock releases tryLock's lock.
func unlock(f *os.File) error { return syscall.Flock(int(f.Fd()), syscall.LOCK_UN) }
