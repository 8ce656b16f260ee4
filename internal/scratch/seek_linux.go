//go:build linux && !portable

package scratch

// lseek(2) whence values that find the next data or hole at or after an
// offset; Linux has had them since 3.1.
const (
	mapsHoles = true
	seekData  = 3
	seekHole  = 4
)
