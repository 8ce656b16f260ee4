package events_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/events"
)

func TestEventRoundTripsAsCloudEvent(t *testing.T) {
	at := time.Date(2026, 11, 23, 8, 0, 0, 0, time.UTC)
	in := events.Converted{JobID: "j1", InputKey: "disks/a.vhdx", OutputBucket: "images", OutputKey: "disks/a.vhdx.raw", SHA256: "ab"}
	ev, err := events.New("id-1", events.TypeConverted, "/imagepipe/convert", "disks/a.vhdx", at, in)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(ev)
	if err != nil {
		t.Fatal(err)
	}
	for _, attr := range []string{`"specversion":"1.0"`, `"id":"id-1"`, `"type":"io.imagepipe.image.converted"`, `"subject":"disks/a.vhdx"`, `"time":"2026-11-23T08:00:00Z"`, `"source":"/imagepipe/convert"`} {
		if !strings.Contains(string(b), attr) {
			t.Errorf("encoded event lacks %s: %s", attr, b)
		}
	}
	back, err := events.Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	var out events.Converted
	if err := back.DecodeData(events.TypeConverted, &out); err != nil {
		t.Fatal(err)
	}
	if out != in {
		t.Errorf("data = %+v, want %+v", out, in)
	}
	if err := back.DecodeData(events.TypeFailed, &out); err == nil {
		t.Error("DecodeData accepted the wrong type")
	}
}

func TestDecodeRefusesNonCloudEvents(t *testing.T) {
	for _, p := range []string{`{}`, `{"specversion":"0.3","id":"a","source":"s","type":"t"}`, `{"specversion":"1.0","source":"s","type":"t"}`, `[`} {
		if _, err := events.Decode([]byte(p)); err == nil {
			t.Errorf("Decode(%s) succeeded", p)
		}
	}
}

func TestJobIDIsStablePerContentVersion(t *testing.T) {
	a := events.JobIDFor(events.ObjectIdentity("uploads", "k", "", "e1"))
	b := events.JobIDFor(events.ObjectIdentity("uploads", "k", "", "e1"))
	c := events.JobIDFor(events.ObjectIdentity("uploads", "k", "", "e2"))
	d := events.JobIDFor(events.ObjectIdentity("uploads", "k\x00", "", "e1"))
	if a != b {
		t.Errorf("same object, different job ids %s %s", a, b)
	}
	if a == c || a == d {
		t.Error("different content or key share a job id")
	}
}

func TestStatusKeyIsValidAndInjective(t *testing.T) {
	keys := []string{"a/b.vhdx", "a.b/vhdx", "a=2Fb.vhdx", "日本.vmdk", "sp ace", "../x", "/lead"}
	seen := map[string]string{}
	for _, k := range keys {
		sk := events.StatusKey("uploads", k)
		for _, c := range sk {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("-_=.", c)) {
				t.Errorf("StatusKey(%q) = %q holds %q", k, sk, c)
			}
		}
		if prev, dup := seen[sk]; dup {
			t.Errorf("StatusKey collides for %q and %q", prev, k)
		}
		seen[sk] = k
	}
}
