//go:build !unix

package scratch

import (
	"errors"
	"os"
)

// The convert function, which keeps job directories, runs on Linux only
// (the command refuses to start elsewhere); these let the package, which
// the commands that run everywhere also use, build on every system.

// DiskSpace is unknown here.
func DiskSpace(string) (free, total int64, err error) { return 0, 0, errors.ErrUnsupported }

func tryLock(*os.File) error { return errors.ErrUnsupported }

func unlock(*os.File) error { return errors.ErrUnsupported }
