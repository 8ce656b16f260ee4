package control_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/control"
)

// afterRequests calls then once n requests on subject have gone by, as
// another subscriber sees them: a way to act after the client has given
// up on n-1 rounds without guessing how long those take.
func afterRequests(t *testing.T, url, subject string, n int, then func()) {
	t.Helper()
	spy := connect(t, url)
	ch := make(chan *nats.Msg, 64)
	if _, err := spy.ChanSubscribe(subject, ch); err != nil {
		t.Fatal(err)
	}
	if err := spy.Flush(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	go func() {
		defer close(done)
		for range n {
			select {
			case <-ch:
			case <-ctx.Done():
				return
			}
		}
		then()
	}()
}

func TestInstanceRequestWaitsForAReplicaThatAnswersLate(t *testing.T) {
	s := startNATS(t)
	slow := make(chan struct{})
	var release sync.Once
	open := func() { release.Do(func() { close(slow) }) }
	t.Cleanup(open)
	loaded := &fakeWorker{state: events.WorkerRunning, slow: slow}
	target := replica(t, s.url, "convert", loaded)
	other := &fakeWorker{state: events.WorkerRunning}
	replica(t, s.url, "convert", other)
	// The loaded replica answers only once the client has sent a third
	// round: two rounds went by with no answer from it.
	afterRequests(t, s.url, events.ReplicaSubject("convert", events.VerbStatus), 3, open)

	client := control.NewClient(s.nc, 100*time.Millisecond).FindWithin(time.Minute)
	drained, err := client.Steer(context.Background(), events.Functions(), events.VerbDrain, target.ID())
	if err != nil {
		t.Fatalf("drain of a replica that answers late: %v", err)
	}
	if len(drained) != 1 || drained[0].Instance != target.ID() || drained[0].State != events.WorkerDraining {
		t.Fatalf("drain answered %+v, want %s draining", drained, target.ID())
	}
	if loaded.timesSteered() != 1 || other.timesSteered() != 0 {
		t.Errorf("drain reached the target %d times and the other replica %d times, want once and never",
			loaded.timesSteered(), other.timesSteered())
	}
}

func TestInstanceRequestFindsAReplicaWhoseServiceStartsLate(t *testing.T) {
	s := startNATS(t)
	const late = "late-starter"
	var drains int
	var mu sync.Mutex
	listen := func() {
		// A replica's control service as it is on the wire, listening only
		// from now on: every request sent before is lost, not queued.
		nc := connect(t, s.url)
		_, err := nc.Subscribe(events.SubjectControlPrefix+".convert.*", func(m *nats.Msg) {
			st := events.ReplicaStatus{Replica: events.Replica{Function: "convert", Instance: late}, State: events.WorkerRunning}
			if strings.HasSuffix(m.Subject, "."+events.VerbDrain) {
				mu.Lock()
				drains++
				mu.Unlock()
				st.State = events.WorkerDraining
			}
			body, _ := json.Marshal(st)
			_ = m.Respond(body)
		})
		if err == nil {
			err = nc.Flush()
		}
		if err != nil {
			t.Error(err)
		}
	}
	afterRequests(t, s.url, events.ReplicaSubject("convert", events.VerbStatus), 2, listen)

	client := control.NewClient(s.nc, 100*time.Millisecond).FindWithin(time.Minute)
	drained, err := client.Steer(context.Background(), []string{"convert"}, events.VerbDrain, late)
	if err != nil {
		t.Fatalf("drain of a replica whose service started after the first rounds: %v", err)
	}
	if len(drained) != 1 || drained[0].Instance != late || drained[0].State != events.WorkerDraining {
		t.Fatalf("drain answered %+v", drained)
	}
	mu.Lock()
	defer mu.Unlock()
	if drains != 1 {
		t.Errorf("drain sent %d times, want once", drains)
	}
}

func TestInstanceRequestNoReplicaAnswersNamesTheDeadlineAndWhoDid(t *testing.T) {
	s := startNATS(t)
	cw, iw := &fakeWorker{state: events.WorkerRunning}, &fakeWorker{state: events.WorkerRunning}
	conv := replica(t, s.url, "convert", cw)
	ing := replica(t, s.url, "ingest", iw)
	const within = time.Second
	client := control.NewClient(s.nc, 100*time.Millisecond).FindWithin(within)

	started := time.Now()
	_, err := client.Steer(context.Background(), events.Functions(), events.VerbDrain, "gone")
	waited := time.Since(started)

	var nie *control.NoInstanceError
	if !errors.As(err, &nie) {
		t.Fatalf("drain of an instance no replica has = %v, want a NoInstanceError", err)
	}
	msg := err.Error()
	for _, want := range []string{`no replica with instance id "gone" answered within 1s`, "IMAGEPIPE_CONNECT_TIMEOUT",
		"2 replicas answered", "ingest " + ing.ID(), "convert " + conv.ID()} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not say %q", msg, want)
		}
	}
	if strings.Index(msg, ing.ID()) > strings.Index(msg, conv.ID()) {
		t.Errorf("error %q lists the replicas out of the order ctl status shows them", msg)
	}
	if waited < within {
		t.Errorf("gave up after %s, before its deadline of %s", waited, within)
	}
	if cw.timesSteered()+iw.timesSteered() != 0 {
		t.Error("a drain meant for a missing instance reached another replica")
	}

	_, err = client.Status(context.Background(), []string{"notify"}, "gone")
	if !errors.As(err, &nie) || len(nie.Seen) != 0 || !strings.Contains(err.Error(), "no replica answered at all") {
		t.Errorf("status of an instance on a function with no replica = %v", err)
	}
}
