//go:build !unix

package main

import (
	"errors"
	"io/fs"
)

// The end-to-end tests run on Linux; these let the package's tests build
// elsewhere, for vet.

func diskBytes(info fs.FileInfo) int64 { return info.Size() }

func fileSystemSize(string) (int64, error) { return 0, errors.ErrUnsupported }
