package stack

import (
	"slices"
	"testing"
)

func TestLogValuesReadsOneAttributeOfEachRecordWithTheMessage(t *testing.T) {
	log := []byte(`time=2026-01-02T03:04:05Z level=INFO msg=converted job=j1 key=a/disk.vmdk
time=2026-01-02T03:04:06Z level=INFO msg="converted later" key=not-this
time=2026-01-02T03:04:07Z level=INFO msg=reconciled keys=a,b
time=2026-01-02T03:04:08Z level=INFO msg=converted job=j2
time=2026-01-02T03:04:09Z level=INFO msg=converted key=b/disk.qcow2 job=j3
`)
	if got, want := LogValues(log, "converted", "key"), []string{"a/disk.vmdk", "", "b/disk.qcow2"}; !slices.Equal(got, want) {
		t.Errorf("converted keys %q, want %q", got, want)
	}
	if got, want := LogValues(log, "reconciled", "keys"), []string{"a,b"}; !slices.Equal(got, want) {
		t.Errorf("reconciled keys %q, want %q", got, want)
	}
}
