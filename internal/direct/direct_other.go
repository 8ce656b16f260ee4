//go:build !linux

package direct

import (
	"errors"
	"os"
)

// setDirect fails: only Linux's O_DIRECT is used, so elsewhere every
// write is buffered.
func setDirect(*os.File, bool) error { return errors.ErrUnsupported }
