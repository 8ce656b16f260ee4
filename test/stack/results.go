package stack

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
)

// Result is one event read from the RESULTS stream.
type Result struct {
	Seq       uint64 // stream sequence
	ID        string // CloudEvents id
	Key       string // the input key (the event's subject)
	At        time.Time
	Converted *events.Converted
	Failed    *events.Failed
}

// Final reports whether no further result is expected for this job: a
// conversion, or a failure that will not be retried.
func (r Result) Final() bool { return r.Converted != nil || (r.Failed != nil && !r.Failed.WillRetry) }

// Results reads every result event from a durable consumer of its own, the
// way a user's program would, so that it survives NATS restarts and counts
// what the stream really holds.
type Results struct {
	cc jetstream.ConsumeContext

	mu      sync.Mutex
	list    []Result
	bad     []string
	changed chan struct{}
}

// CollectResults starts reading results into a new durable consumer.
func (s *Stack) CollectResults(ctx context.Context, durable string) (*Results, error) {
	cons, err := s.JS.CreateOrUpdateConsumer(ctx, events.StreamResults, jetstream.ConsumerConfig{
		Durable:       durable,
		FilterSubject: events.SubjectResults,
		AckPolicy:     jetstream.AckExplicitPolicy,
		DeliverPolicy: jetstream.DeliverAllPolicy,
		AckWait:       30 * time.Second,
	})
	if err != nil {
		return nil, fmt.Errorf("results consumer: %w", err)
	}
	r := &Results{changed: make(chan struct{})}
	r.cc, err = cons.Consume(r.take, jetstream.ConsumeErrHandler(func(jetstream.ConsumeContext, error) {
		// Missed heartbeats and reconnects while NATS restarts: the
		// consumer carries on by itself.
	}))
	if err != nil {
		return nil, err
	}
	return r, nil
}

func (r *Results) take(m jetstream.Msg) {
	at := time.Now()
	res := Result{At: at}
	if md, err := m.Metadata(); err == nil {
		res.Seq = md.Sequence.Stream
	}
	ev, err := events.Decode(m.Data())
	if err == nil {
		res.ID, res.Key = ev.ID, ev.Subject
		switch ev.Type {
		case events.TypeConverted:
			res.Converted = new(events.Converted)
			err = ev.DecodeData(events.TypeConverted, res.Converted)
		case events.TypeFailed:
			res.Failed = new(events.Failed)
			err = ev.DecodeData(events.TypeFailed, res.Failed)
		default:
			err = fmt.Errorf("unexpected type %q", ev.Type)
		}
	}
	r.mu.Lock()
	if err != nil {
		r.bad = append(r.bad, fmt.Sprintf("%s: %v", m.Subject(), err))
	} else if !r.seen(res.Seq) {
		r.list = append(r.list, res)
	}
	close(r.changed)
	r.changed = make(chan struct{})
	r.mu.Unlock()
	_ = m.Ack()
}

// seen reports whether the stream message was already taken: an ack lost
// in a NATS restart redelivers it, which is no second event.
func (r *Results) seen(seq uint64) bool {
	if seq == 0 {
		return false
	}
	for _, x := range r.list {
		if x.Seq == seq {
			return true
		}
	}
	return false
}

// All returns the results so far, in stream order of arrival.
func (r *Results) All() []Result {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]Result(nil), r.list...)
}

// Malformed lists events that could not be decoded.
func (r *Results) Malformed() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.bad...)
}

// Wait blocks until done holds for the results or ctx ends.
func (r *Results) Wait(ctx context.Context, done func([]Result) bool) error {
	for {
		r.mu.Lock()
		list, ch := append([]Result(nil), r.list...), r.changed
		r.mu.Unlock()
		if done(list) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ch:
		case <-time.After(time.Second):
		}
	}
}

// Stop ends the consumption.
func (r *Results) Stop() { r.cc.Stop() }
