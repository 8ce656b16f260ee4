//go:build linux && !portable

package scratch

// usesODirect is whether this build reads and writes with O_DIRECT where
// the file system allows it.
const usesODirect = true
