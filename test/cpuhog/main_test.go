package main

import (
	"runtime"
	"testing"
	"time"
)

func TestRunEndsWithItsCommandAndReturnsItsExitCode(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want int
	}{
		{[]string{"true"}, 0},
		{[]string{"sh", "-c", "exit 3"}, 3},
		{[]string{"/nonexistent/command"}, 2},
		{nil, 2},
	} {
		if got := run(tc.args); got != tc.want {
			t.Errorf("run(%q) = %d, want %d", tc.args, got, tc.want)
		}
	}
}

func TestRunLeavesNoSpinnerBehind(t *testing.T) {
	// A first run starts what stays for the process whatever run does
	// (os/signal's watcher), so the count is taken after it.
	if got := run([]string{"true"}); got != 0 {
		t.Fatalf("run(true) = %d, want 0", got)
	}
	before := runtime.NumGoroutine()
	if got := run([]string{"sleep", "0.2"}); got != 0 {
		t.Fatalf("run(sleep) = %d, want 0", got)
	}
	// The signal relay ends once its channel closes; give it a moment.
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Fatalf("%d goroutines after run, %d before: a spinner outlived its command", n, before)
	}
}
