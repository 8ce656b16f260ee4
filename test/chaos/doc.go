// Package chaos is the fault suite: it runs the real stack with images of
// every format in flight, crashes and restarts its parts, fills scratch and
// takes the notification endpoint down, then proves that nothing was lost,
// duplicated or corrupted. `go test ./test/chaos` runs a reduced size;
// `go tool task chaos` runs the full one (see CHAOS_* in chaos_test.go).
package chaos
