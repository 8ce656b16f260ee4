package events

import "testing"

func TestZeroObjectKeyIsReservedSoNoInputCanBeGivenIt(t *testing.T) {
	for _, prefix := range []string{"", "converted/"} {
		key := ZeroObjectKey(prefix)
		if !HasReservedSegment(key) {
			t.Errorf("zero object key %q has no reserved segment", key)
		}
		// The only input whose output would be the zero object's key has
		// the reserved segment itself, and ingest refuses it.
		input := ReservedSegment + "/zeros"
		if OutputKey(prefix, input, "raw") != key {
			t.Fatalf("the input that would collide is not %q", input)
		}
		if !HasReservedSegment(input) {
			t.Errorf("input %q could be converted onto the zero object", input)
		}
	}
	if HasReservedSegment("disks/imagepipe/win11.vhdx") || HasReservedSegment("disks/.imagepipe-old.vhdx") {
		t.Error("a key merely like the reserved segment counts as reserved")
	}
}
