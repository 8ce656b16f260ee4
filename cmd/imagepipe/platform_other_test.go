//go:build !linux || portable

package main

import (
	"bytes"
	"runtime"
	"strings"
	"testing"
)

func TestFunctionsAndDevRefuseToStartOffLinuxNamingWhatWorks(t *testing.T) {
	for _, what := range []string{"convert", "ingest", "notify", "dev"} {
		var stdout, stderr bytes.Buffer
		if code := run([]string{what}, &stdout, &stderr); code != 1 || stdout.Len() != 0 {
			t.Fatalf("imagepipe %s on %s exited %d with stdout %q, want 1 and nothing on stdout", what, runtime.GOOS, code, stdout.String())
		}
		msg := stderr.String()
		for _, want := range []string{"imagepipe " + what + " runs on Linux only", runtime.GOOS, "upload, inspect, status, watch, ls, ctl, reconvert and import work on every system"} {
			if !strings.Contains(msg, want) {
				t.Errorf("requireLinux(%q) = %q, want it to say %q", what, msg, want)
			}
		}
	}
}
