package stack

import (
	"testing"
	"time"
)

func TestScaledStretchesDeadlinesAndNeverShortensThem(t *testing.T) {
	for _, tc := range []struct {
		env  string
		want time.Duration
	}{
		{"", 10 * time.Second},
		{"3", 30 * time.Second},
		{"2.5", 25 * time.Second},
		{"0.5", 10 * time.Second}, // below 1 would shorten a deadline
		{"fast", 10 * time.Second},
	} {
		t.Setenv(ScaleVar, tc.env)
		if got := Scaled(10 * time.Second); got != tc.want {
			t.Errorf("%s=%q: Scaled(10s) = %s, want %s", ScaleVar, tc.env, got, tc.want)
		}
	}
}
