//go:build unix

package main

import (
	"io/fs"
	"syscall"
)

// diskBytes is how much disk info's file takes, holes excluded.
func diskBytes(info fs.FileInfo) int64 { return info.Sys().(*syscall.Stat_t).Blocks * 512 }

// fileSystemSize is the size of the file system holding dir.
func fileSystemSize(dir string) (int64, error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, err
	}
	return int64(st.Blocks) * int64(st.Bsize), nil
}
