package notify_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/notify"
)

// queueFixture is the JOBS work queue with its convert consumer, and a
// RESULTS stream that also keeps the alerts, as the runtime sets them up.
type queueFixture struct {
	js       jetstream.JetStream
	consumer jetstream.Consumer
	results  jetstream.Stream
}

func newQueueFixture(t *testing.T) queueFixture {
	t.Helper()
	ctx := context.Background()
	js := startJetStream(t)
	jobs, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name: events.StreamJobs, Subjects: []string{events.SubjectConvertJob}, Retention: jetstream.WorkQueuePolicy,
	})
	if err != nil {
		t.Fatal(err)
	}
	cons, err := jobs.CreateOrUpdateConsumer(ctx, jetstream.ConsumerConfig{
		Durable: events.ConsumerConvert, AckPolicy: jetstream.AckExplicitPolicy,
	})
	if err != nil {
		t.Fatal(err)
	}
	results, err := js.CreateStream(ctx, jetstream.StreamConfig{
		Name:     events.StreamResults,
		Subjects: []string{events.SubjectConverted, events.SubjectFailed, events.SubjectStalled},
	})
	if err != nil {
		t.Fatal(err)
	}
	return queueFixture{js: js, consumer: cons, results: results}
}

// alerts reads every alert stored so far, oldest first.
func (q queueFixture) alerts(t *testing.T) []events.Event {
	t.Helper()
	ctx := context.Background()
	info, err := q.results.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []events.Event
	for seq := info.State.FirstSeq; seq <= info.State.LastSeq && info.State.Msgs > 0; seq++ {
		m, err := q.results.GetMsg(ctx, seq)
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if m.Subject != events.SubjectStalled {
			continue
		}
		ev, err := events.Decode(m.Data)
		if err != nil {
			t.Fatal(err)
		}
		if id := m.Header.Get(jetstream.MsgIDHeader); id != ev.ID {
			t.Errorf("alert %s published with Nats-Msg-Id %q", ev.ID, id)
		}
		out = append(out, ev)
	}
	return out
}

func (q queueFixture) waitForAlerts(t *testing.T, n int, within time.Duration) []events.Event {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		got := q.alerts(t)
		if len(got) >= n || time.Now().After(deadline) {
			return got
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func runWatchdog(t *testing.T, js jetstream.JetStream, stallAfter time.Duration, opts ...notify.WatchdogOption) context.CancelFunc {
	t.Helper()
	log, _ := newLogger()
	opts = append([]notify.WatchdogOption{notify.WithCheckInterval(100 * time.Millisecond), notify.WithLeaseTTL(time.Second)}, opts...)
	w, err := notify.NewWatchdog(context.Background(), js, stallAfter, log, opts...)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { w.Run(ctx) })
	stop := func() { cancel(); wg.Wait() }
	t.Cleanup(stop)
	return stop
}

func TestWatchdogAlertsOnceOnStalledQueueThenRecovers(t *testing.T) {
	q := newQueueFixture(t)
	ctx := context.Background()
	job := mustEvent(t, "job-1", events.TypeConvertJob, "disks/win11.vhdx", events.ConvertJob{JobID: "job-1", Bucket: "uploads", Key: "disks/win11.vhdx"})
	ack, err := q.js.Publish(ctx, events.SubjectConvertJob, mustJSON(t, job))
	if err != nil {
		t.Fatal(err)
	}
	queued, err := q.js.Stream(ctx, events.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	first, err := queued.GetMsg(ctx, ack.Sequence)
	if err != nil {
		t.Fatal(err)
	}

	// Two replicas, as in production: one alert all the same.
	const stallAfter = 1500 * time.Millisecond
	runWatchdog(t, q.js, stallAfter)
	runWatchdog(t, q.js, stallAfter)

	if got := q.waitForAlerts(t, 1, 300*time.Millisecond); len(got) != 0 {
		t.Fatalf("alert before the queue was idle for %s: %v", stallAfter, got)
	}
	got := q.waitForAlerts(t, 1, 5*time.Second)
	if len(got) != 1 {
		t.Fatalf("got %d alerts, want the stall alert", len(got))
	}
	stall := got[0]
	var a notify.QueueAlert
	if err := stall.DecodeData(events.TypeStalled, &a); err != nil {
		t.Fatal(err)
	}
	if a.Stream != "JOBS" || a.Consumer != "convert" || a.QueueDepth != 1 || !a.LastActivity.Equal(first.Time) {
		t.Errorf("stall alert = %+v; want depth 1, last activity %s (the job's arrival)", a, first.Time)
	}
	if stall.Source == "" || stall.Subject != "JOBS/convert" || stall.SpecVersion != "1.0" {
		t.Errorf("stall envelope = %+v", stall)
	}

	// Many more ticks: still one alert.
	time.Sleep(time.Second)
	if got := q.alerts(t); len(got) != 1 {
		t.Fatalf("got %d alerts while the stall went on, want 1", len(got))
	}

	// A worker takes the job: the queue moves again.
	batch, err := q.consumer.Fetch(1, jetstream.FetchMaxWait(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	for m := range batch.Messages() {
		if err := m.DoubleAck(ctx); err != nil {
			t.Fatal(err)
		}
	}
	got = q.waitForAlerts(t, 2, 5*time.Second)
	if len(got) != 2 || got[1].Type != events.TypeQueueRecover {
		t.Fatalf("alerts = %v, want stalled then recovered", got)
	}
	var r notify.QueueAlert
	if err := got[1].DecodeData(events.TypeQueueRecover, &r); err != nil {
		t.Fatal(err)
	}
	if r.QueueDepth != 0 || r.StalledSince == nil || !r.StalledSince.Equal(a.LastActivity) || !r.LastActivity.After(a.LastActivity) {
		t.Errorf("recovery = %+v", r)
	}
	time.Sleep(500 * time.Millisecond)
	if got := q.alerts(t); len(got) != 2 {
		t.Errorf("got %d alerts after recovery, want 2", len(got))
	}
}

func TestWatchdogLeaseHasOneHolderAndPassesOn(t *testing.T) {
	q := newQueueFixture(t)
	ctx := context.Background()
	stopA := runWatchdog(t, q.js, time.Hour)
	kv, err := q.js.KeyValue(ctx, events.WatchdogBucket)
	if err != nil {
		t.Fatal(err)
	}
	holder := func() string {
		e, err := kv.Get(ctx, "lease")
		if err != nil {
			return ""
		}
		return string(e.Value())
	}
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !ok() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	waitFor("a lease holder", func() bool { return holder() != "" })
	a := holder()
	runWatchdog(t, q.js, time.Hour)
	time.Sleep(500 * time.Millisecond)
	if h := holder(); h != a {
		t.Fatalf("lease moved from %q to %q while its holder was alive", a, h)
	}
	stopA()
	waitFor("the second replica to take over", func() bool { h := holder(); return h != "" && h != a })
}

func TestStalledAlertReachesStalledChannels(t *testing.T) {
	q := newQueueFixture(t)
	ctx := context.Background()
	if _, err := q.js.Publish(ctx, events.SubjectConvertJob, []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	runWatchdog(t, q.js, 500*time.Millisecond)
	got := q.waitForAlerts(t, 1, 5*time.Second)
	if len(got) != 1 {
		t.Fatalf("no alert")
	}
	slack := newService(t, slackWebhookCheck, answer{status: 200, body: "ok"})
	h, _ := newHandler(t, notify.Config{NotifyOn: []string{"stalled"}, SlackWebhookURL: slack.URL + slackWebhookPath}, nil)
	if err := handle(t, h, got[0]); err != nil {
		t.Fatal(err)
	}
	msg := decodeSlack(t, slack.requests()[0].body)
	if att := msg["attachments"].([]any)[0].(map[string]any); att["color"] != "warning" {
		t.Errorf("stall colour = %v", att["color"])
	}
}

func TestWatchdogCountsProgressOfALongJobAsActivity(t *testing.T) {
	q := newQueueFixture(t)
	ctx := context.Background()
	kv, err := q.js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: events.StatusBucket})
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"job-long", "job-waiting"} {
		job := mustEvent(t, id, events.TypeConvertJob, id, events.ConvertJob{JobID: id, Bucket: "uploads", Key: id})
		if _, err := q.js.Publish(ctx, events.SubjectConvertJob, mustJSON(t, job)); err != nil {
			t.Fatal(err)
		}
	}
	// A replica takes the first job and works on it for a long time,
	// acknowledging nothing; the second waits behind it.
	if _, err := q.consumer.Fetch(1, jetstream.FetchMaxWait(2*time.Second)); err != nil {
		t.Fatal(err)
	}
	const stallAfter = 1500 * time.Millisecond
	runWatchdog(t, q.js, stallAfter)

	// While its status keeps moving, the queue is not stalled.
	until := time.Now().Add(3 * stallAfter)
	for pct := 1; time.Now().Before(until); pct++ {
		if _, err := kv.Put(ctx, "uploads.job-long", fmt.Appendf(nil, `{"state":"CONVERTING","percent":%d}`, pct)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if got := q.alerts(t); len(got) != 0 {
		t.Fatalf("alerts while the running job recorded progress: %v", got)
	}
	// Once it stops moving, it is, even while uploads queued behind it
	// keep writing their own records.
	until = time.Now().Add(3 * stallAfter)
	for i := 0; time.Now().Before(until) && len(q.alerts(t)) == 0; i++ {
		if _, err := kv.Put(ctx, fmt.Sprintf("uploads.new-%d", i), []byte(`{"state":"QUEUED"}`)); err != nil {
			t.Fatal(err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if got := q.alerts(t); len(got) != 1 || got[0].Type != events.TypeStalled {
		t.Fatalf("alerts after the job stopped moving = %v, want one stall alert", got)
	}
}
