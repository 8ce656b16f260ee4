//go:build !unix

package bench

// settleDisk does nothing: the benchmark runs on Linux, and elsewhere the
// package only builds.
func settleDisk() {}
