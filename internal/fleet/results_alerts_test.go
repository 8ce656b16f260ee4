package fleet_test

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/fleet"
)

// RESULTS keeps the watchdog's alerts beside the results. A read of the
// results ends at the last result, not at the stream's last message: an
// alert there, or only alerts, must not keep it waiting.
func TestFleetStatsEndAtTheLastResultWhenAlertsFollowIt(t *testing.T) {
	s := startNATS(t)
	ctx := context.Background()
	_, err := s.js.CreateStream(ctx, jetstream.StreamConfig{Name: events.StreamResults,
		Subjects: []string{events.SubjectConverted, events.SubjectFailed, events.SubjectStalled}})
	if err != nil {
		t.Fatal(err)
	}
	alert := func() {
		t.Helper()
		if _, err := s.js.Publish(ctx, events.SubjectStalled, []byte(`{"type":"io.imagepipe.queue.stalled"}`)); err != nil {
			t.Fatal(err)
		}
	}
	read := func(want int64) {
		t.Helper()
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		st, err := fleet.ReadResults(rctx, s.js)
		if err != nil || st.Events != want {
			t.Fatalf("ReadResults = %d events, %v; want %d", st.Events, err, want)
		}
	}
	alert()
	read(0)
	for _, m := range []events.Message{converted("c1", "vhdx", 10, ""), failed("f1", "vmdk", false, "")} {
		if _, err := s.js.Publish(ctx, m.Subject, raw(t, m)); err != nil {
			t.Fatal(err)
		}
	}
	alert()
	read(2)
}
