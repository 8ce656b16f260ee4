package fleet_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/fleet"
)

func converted(id, format string, ms int64, dupOf string) events.Message {
	ev, _ := events.New(id, events.TypeConverted, "/test", "k", time.Unix(1_800_000_000, 0), events.Converted{
		JobID: "job-" + id, InputFormat: format, InputSize: 100, OutputSize: 1000, DurationMS: ms, DuplicateOf: dupOf,
	})
	return events.Message{Subject: events.SubjectConverted, Event: ev}
}

func failed(id, format string, retry bool, rule string) events.Message {
	ev, _ := events.New(id, events.TypeFailed, "/test", "k", time.Unix(1_800_000_100, 0), events.Failed{
		JobID: "job-" + id, InputFormat: format, WillRetry: retry, Rule: rule, Phase: events.PhaseInspect,
	})
	return events.Message{Subject: events.SubjectFailed, Event: ev}
}

func raw(t *testing.T, m events.Message) []byte {
	t.Helper()
	b, err := json.Marshal(m.Event)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestFleetStatsCountRetriesApartFromFailures(t *testing.T) {
	a := fleet.NewAggregator()
	for _, m := range []events.Message{
		converted("c1", "vhdx", 1000, ""),
		converted("c2", "vhdx", 3000, ""),
		converted("c2", "vhdx", 3000, ""), // the same event again
		converted("c3", "vmdk", 2000, ""),
		converted("d1", "vhdx", 10, "images/x.raw"),
		failed("f1", "vhdx", true, ""),
		failed("f2", "vhdx", false, "backing-file"),
		failed("f3", "", false, ""),
		failed("x1", "qcow2", false, events.RuleCancelled),
	} {
		a.Add(raw(t, m))
	}
	a.Add([]byte("not an event"))
	s := a.Stats()
	want := fleet.ResultStats{Events: 8, Processed: 7, Outcomes: fleet.Outcomes{Converted: 3, Duplicates: 1, Failed: 2, Cancelled: 1, Retried: 1}, BytesIn: 400, BytesOut: 4000}
	if s.Events != want.Events || s.Processed != want.Processed || s.Converted != want.Converted || s.Duplicates != want.Duplicates ||
		s.Failed != want.Failed || s.Cancelled != want.Cancelled || s.Retried != want.Retried || s.BytesIn != want.BytesIn || s.BytesOut != want.BytesOut {
		t.Errorf("stats = %+v\nwant  %+v", s, want)
	}
	if math.Abs(s.SuccessRate-4.0/6.0) > 1e-9 {
		t.Errorf("success rate = %v, want 4/6", s.SuccessRate)
	}
	if s.AvgSeconds != 2 || s.P50Seconds != 2 || s.P95Seconds != 3 {
		t.Errorf("durations avg %v p50 %v p95 %v, want 2 2 3 (duplicates excluded)", s.AvgSeconds, s.P50Seconds, s.P95Seconds)
	}
	vhdx := s.ByFormat["vhdx"]
	if vhdx == nil || vhdx.Converted != 2 || vhdx.Duplicates != 1 || vhdx.Failed != 1 || vhdx.Retried != 1 || math.Abs(vhdx.SuccessRate-0.75) > 1e-9 {
		t.Errorf("vhdx = %+v", vhdx)
	}
	if u := s.ByFormat["unknown"]; u == nil || u.Failed != 1 {
		t.Errorf("a failure before the format was known is not under unknown: %+v", s.ByFormat)
	}
}

func TestFleetStatsSayHowMuchOfTheOutputsWereZerosCopiedServerSide(t *testing.T) {
	a := fleet.NewAggregator()
	for _, c := range []events.Converted{
		{JobID: "job-a", OutputSize: 64 << 30, ZeroFraction: 0.984375}, // 1 GiB of data
		{JobID: "job-b", OutputSize: 1 << 30},                          // no zero part
		{JobID: "job-c", OutputSize: 1 << 30, ZeroFraction: 1},         // all zeros
		{JobID: "job-d", OutputSize: 2 << 30, ZeroFraction: 1.5},       // out of range: at most all of it
	} {
		ev, err := events.New("ev-"+c.JobID, events.TypeConverted, "/test", "k", time.Unix(1_800_000_000, 0), c)
		if err != nil {
			t.Fatal(err)
		}
		a.Add(raw(t, events.Message{Subject: events.SubjectConverted, Event: ev}))
	}
	s := a.Stats()
	wantZero := int64(63<<30 + 1<<30 + 2<<30)
	if s.BytesOut != 68<<30 || s.BytesZero != wantZero {
		t.Errorf("bytes out %d, zero %d; want %d and %d", s.BytesOut, s.BytesZero, int64(68<<30), wantZero)
	}
	if want := float64(wantZero) / float64(68<<30); math.Abs(s.ZeroFraction-want) > 1e-12 {
		t.Errorf("zero fraction = %v, want %v", s.ZeroFraction, want)
	}
	if fleet.NewAggregator().Stats().ZeroFraction != 0 {
		t.Error("no output at all has a zero fraction")
	}
}

func TestFleetStatsAreTheSameForAnyNewReader(t *testing.T) {
	s := startNATS(t)
	ctx := context.Background()
	_, err := s.js.CreateStream(ctx, jetstream.StreamConfig{Name: events.StreamResults, Subjects: []string{events.SubjectResults}})
	if err != nil {
		t.Fatal(err)
	}
	empty, err := fleet.ReadResults(ctx, s.js)
	if err != nil || empty.Events != 0 {
		t.Fatalf("empty stream: %+v, %v", empty, err)
	}
	for i := range 600 {
		m := converted(fmt.Sprint("c", i), "vhdx", int64(i), "")
		if i%3 == 0 {
			m = failed(fmt.Sprint("f", i), "vmdk", i%2 == 0, "")
		}
		if _, err := s.js.Publish(ctx, m.Subject, raw(t, m)); err != nil {
			t.Fatal(err)
		}
	}
	first, err := fleet.ReadResults(ctx, s.js)
	if err != nil {
		t.Fatal(err)
	}
	if first.Events != 600 || first.Converted != 400 || first.Retried != 100 || first.Failed != 100 {
		t.Errorf("stats = %+v", first)
	}
	// A reader on a fresh connection, as after any replica's restart.
	js := s.reader(t)
	again, err := fleet.ReadResults(ctx, js)
	if err != nil {
		t.Fatal(err)
	}
	a, _ := json.Marshal(first)
	b, _ := json.Marshal(again)
	if string(a) != string(b) {
		t.Errorf("a second reader disagrees:\n%s\n%s", a, b)
	}
}
