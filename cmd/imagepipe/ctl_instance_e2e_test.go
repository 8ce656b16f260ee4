package main

import (
	"strings"
	"testing"
)

func TestCtlForAnInstanceNoReplicaHasWaitsTheConnectTimeoutAndNamesWhoAnswered(t *testing.T) {
	stackEnv(t)
	t.Setenv("IMAGEPIPE_CONNECT_TIMEOUT", "2s")
	stackConvert := convertInstances(t)

	r := imagepipe(t, "ctl", "drain", "--instance", "no-such-replica", "--timeout", "200ms")
	if r.code != 1 {
		t.Fatalf("ctl drain of an unknown instance exited %d, want 1\n%s%s", r.code, r.stdout, r.stderr)
	}
	// It looks for four times the connect timeout: a loaded machine's
	// replicas answer late, and the wait scales with what the operator set.
	for _, want := range append([]string{`no replica with instance id "no-such-replica" answered within 8s`,
		"IMAGEPIPE_CONNECT_TIMEOUT", " answered: "}, stackConvert...) {
		if !strings.Contains(r.stderr, want) {
			t.Errorf("ctl said %q, which does not name %q", r.stderr, want)
		}
	}

	// A replica that is there is found at once, however long the wait for
	// a missing one.
	found := ctlJSON[[]struct{ Instance string }](t, "status", "--instance", stackConvert[0])
	if len(found) != 1 || found[0].Instance != stackConvert[0] {
		t.Errorf("ctl status --instance %s answered %+v", stackConvert[0], found)
	}
}
