//go:build linux && !portable

package main

import "testing"

func TestFunctionsAndDevStartOnLinux(t *testing.T) {
	for _, what := range []string{"convert", "ingest", "notify", "dev"} {
		if err := requireLinux(what); err != nil {
			t.Errorf("requireLinux(%q) on Linux: %v", what, err)
		}
	}
}
