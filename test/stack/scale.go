package stack

import (
	"os"
	"strconv"
	"time"
)

// ScaleVar names the factor every test deadline is multiplied by. A
// loaded machine answers late, not wrongly: `go tool task stress` raises
// the factor while it keeps every core busy, and a test that still misses
// a deadline then is slow for a reason of its own.
const ScaleVar = "IMAGEPIPE_TEST_SCALE"

// Scale is the factor in IMAGEPIPE_TEST_SCALE: 1 when unset, and never
// below 1, so that no setting makes a deadline shorter than it was written.
func Scale() float64 {
	f, err := strconv.ParseFloat(os.Getenv(ScaleVar), 64)
	if err != nil || f < 1 {
		return 1
	}
	return f
}

// Scaled is d, a test's deadline as written for an idle machine, times
// Scale. Only deadlines scale: a wait that proves nothing happens (for
// instance that a second READY never comes) stays as written.
func Scaled(d time.Duration) time.Duration {
	return time.Duration(float64(d) * Scale())
}
