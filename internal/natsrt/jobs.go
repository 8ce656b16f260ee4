package natsrt

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
)

// Outcome is what the runtime did with a message once its handler returned.
type Outcome string

const (
	OutcomeAcked      Outcome = "acked"      // done, events published
	OutcomeRetried    Outcome = "retried"    // nak'd with back-off for another attempt
	OutcomeTerminated Outcome = "terminated" // permanent failure, or attempts used up
	OutcomeCancelled  Outcome = "cancelled"  // stopped by an operator; never retried
	OutcomeAborted    Outcome = "aborted"    // cut short by a stop; handed to another replica at once
)

// Finished reports one handled message to observers.
type Finished struct {
	Job     events.JobInfo
	Outcome Outcome
	// Events are what the handler returned; they were published unless the
	// outcome is aborted.
	Events []events.Message
	Err    error
	Took   time.Duration
}

// Observer follows every message a worker handles. Both methods run on the
// worker's goroutine and must return quickly.
type Observer interface {
	Started(events.JobInfo)
	Finished(Finished)
}

type trackedJob struct {
	info   events.JobInfo
	cancel context.CancelCauseFunc
}

// Jobs lists the messages in flight, oldest first.
func (w *Worker) Jobs() []events.JobInfo {
	c := &w.ctl
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]events.JobInfo, 0, len(c.jobs))
	for j := range c.jobs {
		out = append(out, j.info)
	}
	sortJobs(out)
	return out
}

// Cancel cancels every in-flight job working on bucket/key, with
// failure.ErrCancelled as the cause so the handler can tell an operator's
// cancel from a shutdown. It returns the jobs it cancelled. A job only
// queued is not here: see the status record for that.
func (w *Worker) Cancel(bucket, key string) []events.JobInfo {
	c := &w.ctl
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []events.JobInfo
	for j := range c.jobs {
		if j.info.Bucket == bucket && j.info.Key == key {
			j.cancel(failure.ErrCancelled)
			out = append(out, j.info)
		}
	}
	sortJobs(out)
	return out
}

// Counts returns what the worker has done since the process started.
func (w *Worker) Counts() events.WorkerCounts {
	c := &w.ctl
	return events.WorkerCounts{
		Handled: c.handled.Load(), Acked: c.acked.Load(), Retried: c.retried.Load(),
		Terminated: c.terminated.Load(), Cancelled: c.cancelled.Load(), Aborted: c.aborted.Load(),
	}
}

// Observe adds an observer until the returned func is called.
func (w *Worker) Observe(o Observer) (remove func()) {
	c := &w.ctl
	key := &o
	c.mu.Lock()
	if c.observers == nil {
		c.observers = map[*Observer]struct{}{}
	}
	c.observers[key] = struct{}{}
	c.mu.Unlock()
	return func() {
		c.mu.Lock()
		delete(c.observers, key)
		c.mu.Unlock()
	}
}

// Consumer describes the worker's durable consumer, whose pending counts
// are the queue in front of the function.
func (w *Worker) Consumer(ctx context.Context) (*jetstream.ConsumerInfo, error) {
	cons, err := w.js.Consumer(ctx, w.binding.Stream, w.binding.Durable)
	if err != nil {
		return nil, fmt.Errorf("consumer %s: %w", w.binding.Durable, err)
	}
	info, err := cons.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("consumer %s: %w", w.binding.Durable, err)
	}
	return info, nil
}

// track gives a message its own cancellable context and makes it visible
// to Jobs and Cancel until the returned func is called.
func (w *Worker) track(jobCtx context.Context, data []byte, d Delivery) (context.Context, *trackedJob) {
	ctx, cancel := context.WithCancelCause(jobCtx)
	j := &trackedJob{info: events.JobInfo{Attempt: d.Attempt, Started: time.Now()}, cancel: cancel}
	if w.binding.Describe != nil {
		j.info.JobRef = w.binding.Describe(data)
	}
	c := &w.ctl
	c.mu.Lock()
	if c.jobs == nil {
		c.jobs = map[*trackedJob]struct{}{}
	}
	c.jobs[j] = struct{}{}
	obs := c.observerList()
	c.mu.Unlock()
	for _, o := range obs {
		o.Started(j.info)
	}
	return ctx, j
}

// finish counts the outcome, tells the observers and forgets the job.
func (w *Worker) finish(j *trackedJob, outcome Outcome, out []events.Message, herr error) {
	c := &w.ctl
	c.handled.Add(1)
	switch outcome {
	case OutcomeAcked:
		c.acked.Add(1)
	case OutcomeRetried:
		c.retried.Add(1)
	case OutcomeTerminated:
		c.terminated.Add(1)
	case OutcomeCancelled:
		c.cancelled.Add(1)
	case OutcomeAborted:
		c.aborted.Add(1)
	}
	c.mu.Lock()
	delete(c.jobs, j)
	obs := c.observerList()
	c.mu.Unlock()
	j.cancel(nil)
	f := Finished{Job: j.info, Outcome: outcome, Events: out, Err: herr, Took: time.Since(j.info.Started)}
	for _, o := range obs {
		o.Finished(f)
	}
}

// observerList copies the observers; c.mu is held.
func (c *control) observerList() []Observer {
	out := make([]Observer, 0, len(c.observers))
	for o := range c.observers {
		out = append(out, *o)
	}
	return out
}

func sortJobs(js []events.JobInfo) {
	slices.SortFunc(js, func(a, b events.JobInfo) int { return a.Started.Compare(b.Started) })
}
