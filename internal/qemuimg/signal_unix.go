//go:build unix

package qemuimg

import "syscall"

// sigXCPU is what RLIMIT_CPU's soft limit delivers.
const sigXCPU = syscall.SIGXCPU
