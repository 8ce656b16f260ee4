//go:build unix

package decompress

import "syscall"

// freeSpace is what the file system holding dir has free for an
// unprivileged user, and its size, in bytes.
func freeSpace(dir string) (free, size int64, err error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, 0, err
	}
	return int64(st.Bavail) * int64(st.Bsize), int64(st.Blocks) * int64(st.Bsize), nil
}
