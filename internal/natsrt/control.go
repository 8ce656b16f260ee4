package natsrt

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
)

// JobRef names the input a message works on. The runtime only has bytes;
// a Binding's Describe turns them into this so that an operator can cancel
// a job by its input and metrics can follow it.
type JobRef struct {
	ID     string `json:"job_id,omitempty"`
	Bucket string `json:"bucket,omitempty"`
	Key    string `json:"key,omitempty"`
}

// JobInfo is one message being handled now.
type JobInfo struct {
	JobRef
	Attempt int       `json:"attempt"`
	Started time.Time `json:"started"`
}

// State is where a worker is in its life.
type State string

const (
	StateStarting State = "starting" // Run has not bound the consumer yet
	StateRunning  State = "running"
	StatePaused   State = "paused"   // fetching nothing new; in-flight jobs go on
	StateDraining State = "draining" // finishing in-flight jobs, then Run returns
	StateStopping State = "stopping" // in-flight jobs aborted and handed back
	StateStopped  State = "stopped"
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
	Job     JobInfo
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
	Started(JobInfo)
	Finished(Finished)
}

// Counts are what one worker has done since it started. They die with the
// process; durable statistics are derived from the results stream.
type Counts struct {
	Handled    int64 `json:"handled"`
	Acked      int64 `json:"acked"`
	Retried    int64 `json:"retried"`
	Terminated int64 `json:"terminated"`
	Cancelled  int64 `json:"cancelled"`
	Aborted    int64 `json:"aborted"`
}

// control is the operator-facing state of a worker: pausing, draining,
// stopping, the jobs in flight, and who watches them.
type control struct {
	mu        sync.Mutex
	fetches   map[*fetchHandle]struct{}
	jobs      map[*trackedJob]struct{}
	observers map[*Observer]struct{}
	fetchCtx  context.Context    // Run's fetch context; a signal may end it too
	drain     context.CancelFunc // cancels fetchCtx
	stop      context.CancelFunc // cancels Run's job context
	draining  bool
	stopping  bool
	running   bool
	done      bool
	started   time.Time

	handled, acked, retried, terminated, cancelled, aborted atomic.Int64
}

type fetchHandle struct {
	cancel context.CancelFunc
	ended  chan struct{} // closed once the pull has returned
}

type trackedJob struct {
	info   JobInfo
	cancel context.CancelCauseFunc
}

// begin derives the contexts Run works under, so that Drain and Stop can
// end them without the caller's help.
func (w *Worker) begin(ctx, jobCtx context.Context) (context.Context, context.Context) {
	c := &w.ctl
	ctx, drain := context.WithCancel(ctx)
	jobCtx, stop := context.WithCancel(jobCtx)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.fetchCtx, c.drain, c.stop = ctx, drain, stop
	c.running, c.done = true, false
	c.started = time.Now()
	// A drain or stop asked for before Run started still counts.
	if c.draining || c.stopping {
		drain()
	}
	if c.stopping {
		stop()
	}
	return ctx, jobCtx
}

// end marks the worker stopped and releases Run's contexts.
func (w *Worker) end() {
	c := &w.ctl
	c.mu.Lock()
	defer c.mu.Unlock()
	c.running, c.done = false, true
	if c.drain != nil {
		c.drain()
		c.stop()
	}
}

// Drain stops fetching for good and lets in-flight messages finish; Run
// then returns nil.
func (w *Worker) Drain() {
	c := &w.ctl
	c.mu.Lock()
	defer c.mu.Unlock()
	c.draining = true
	if c.drain != nil {
		c.drain()
	}
}

// Stop stops fetching and aborts in-flight messages. They are nak'd
// without delay, so another replica takes them over at once, and their
// handlers' events are not published: the work was not done.
func (w *Worker) Stop() {
	c := &w.ctl
	c.mu.Lock()
	defer c.mu.Unlock()
	c.draining, c.stopping = true, true
	if c.drain != nil {
		c.drain()
		c.stop()
	}
}

// State says what the worker is doing.
func (w *Worker) State() State {
	c := &w.ctl
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.done:
		return StateStopped
	case c.stopping:
		return StateStopping
	case c.draining:
		return StateDraining
	case !c.running:
		return StateStarting
	case c.fetchCtx.Err() != nil:
		// A drain started by a signal, not by Drain.
		return StateDraining
	case w.paused.Load():
		return StatePaused
	}
	return StateRunning
}

// Started is when Run began, zero before.
func (w *Worker) Started() time.Time {
	w.ctl.mu.Lock()
	defer w.ctl.mu.Unlock()
	return w.ctl.started
}

// Jobs lists the messages in flight, oldest first.
func (w *Worker) Jobs() []JobInfo {
	c := &w.ctl
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]JobInfo, 0, len(c.jobs))
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
func (w *Worker) Cancel(bucket, key string) []JobInfo {
	c := &w.ctl
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []JobInfo
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
func (w *Worker) Counts() Counts {
	c := &w.ctl
	return Counts{
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

// fetchContext is ctx, also cancelled by Pause, so that a pull waiting for
// a message gives up instead of taking one after the pause.
func (w *Worker) fetchContext(ctx context.Context) (context.Context, context.CancelFunc) {
	fctx, cancel := context.WithCancel(ctx)
	h := &fetchHandle{cancel: cancel, ended: make(chan struct{})}
	c := &w.ctl
	c.mu.Lock()
	if c.fetches == nil {
		c.fetches = map[*fetchHandle]struct{}{}
	}
	c.fetches[h] = struct{}{}
	c.mu.Unlock()
	// Pause may have come between the caller's check and the registration.
	if w.paused.Load() {
		cancel()
	}
	return fctx, func() {
		c.mu.Lock()
		delete(c.fetches, h)
		c.mu.Unlock()
		cancel()
		close(h.ended)
	}
}

// interruptFetches ends every pull now waiting for a message and waits,
// up to timeout, until each has returned and its subscription is gone
// from the server. A message arriving before that would be handed to a
// pull nobody reads any more and wait out AckWait before anyone saw it.
func (w *Worker) interruptFetches(timeout time.Duration) {
	nc := w.js.Conn()
	subs := 0
	if nc != nil {
		subs = nc.NumSubscriptions()
	}
	c := &w.ctl
	c.mu.Lock()
	var ended []chan struct{}
	for h := range c.fetches {
		h.cancel()
		ended = append(ended, h.ended)
	}
	c.mu.Unlock()
	deadline := time.Now().Add(timeout)
	for _, e := range ended {
		select {
		case <-e:
		case <-time.After(time.Until(deadline)):
			return
		}
	}
	if nc == nil {
		return
	}
	// A fetch returns before it unsubscribes (nats.go closes its messages
	// channel, then unsubscribes, on the same goroutine): wait for the
	// subscriptions to go, then flush, so that the server has dropped
	// them before Pause returns.
	for nc.NumSubscriptions() > subs-len(ended) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	_ = nc.FlushTimeout(max(time.Until(deadline), 100*time.Millisecond))
}

// track gives a message its own cancellable context and makes it visible
// to Jobs and Cancel until the returned func is called.
func (w *Worker) track(jobCtx context.Context, data []byte, d Delivery) (context.Context, *trackedJob) {
	ctx, cancel := context.WithCancelCause(jobCtx)
	j := &trackedJob{info: JobInfo{Attempt: d.Attempt, Started: time.Now()}, cancel: cancel}
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

func sortJobs(js []JobInfo) {
	slices.SortFunc(js, func(a, b JobInfo) int { return a.Started.Compare(b.Started) })
}
