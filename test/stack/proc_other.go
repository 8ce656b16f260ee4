//go:build !linux

package stack

import "syscall"

// dieWithParent is nothing: only Linux kills a child with its parent, and
// the stack's tests run on Linux; elsewhere the package only builds.
func dieWithParent() *syscall.SysProcAttr { return nil }
