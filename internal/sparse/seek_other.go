//go:build !linux

package sparse

// Without SEEK_DATA/SEEK_HOLE, mapData's first Seek lands at the offset
// asked for and the second at the end: the whole file is one data extent.
const (
	seekData = 0 // io.SeekStart
	seekHole = 2 // io.SeekEnd
)
