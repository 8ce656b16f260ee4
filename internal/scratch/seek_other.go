//go:build !linux || portable

package scratch

// Without SEEK_DATA/SEEK_HOLE (or in a build tagged portable, which keeps
// to what every system has), mapData's first Seek lands at the offset
// asked for and the second past the end: the whole file is one data
// extent, read like any other. Holes knows no hole.
const (
	mapsHoles = false
	seekData  = 0 // io.SeekStart
	seekHole  = 2 // io.SeekEnd
)
