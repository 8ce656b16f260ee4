//go:build !unix

package qemuimg

import "syscall"

// sigXCPU stands in for a signal this system does not have; no process is
// ever reported as killed by it.
const sigXCPU = syscall.Signal(-1)
