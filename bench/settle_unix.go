//go:build unix

package bench

import "syscall"

// settleDisk writes back what earlier runs left dirty, so that each timed
// run starts with the disk idle rather than paying for its predecessor's
// writeback.
func settleDisk() { syscall.Sync() }
