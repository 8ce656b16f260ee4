package natsrt

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/imagepipe/imagepipe/events"
)

// A worker's life, as an operator steers it: Run starts it; Pause and
// Resume stop and restart fetching; Drain lets the jobs in flight finish
// and ends Run; Stop aborts them and hands them back to the queue. Every
// change is made here, under the one lock of the worker's control state.

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
func (w *Worker) end() { w.halt(func(c *control) { c.running, c.done = false, true }) }

// halt marks the worker as mark says and, once Run has started, cancels
// both its fetching and its in-flight jobs.
func (w *Worker) halt(mark func(*control)) {
	c := &w.ctl
	c.mu.Lock()
	defer c.mu.Unlock()
	mark(c)
	if c.drain != nil {
		c.drain()
		c.stop()
	}
}

// Pause stops fetching; in-flight messages finish. When it returns, no
// message published afterwards goes to this worker until Resume.
func (w *Worker) Pause() {
	w.paused.Store(true)
	w.interruptFetches(2 * time.Second)
}

// Resume starts fetching again.
func (w *Worker) Resume() { w.paused.Store(false) }

// Paused reports whether fetching is paused.
func (w *Worker) Paused() bool { return w.paused.Load() }

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
func (w *Worker) Stop() { w.halt(func(c *control) { c.draining, c.stopping = true, true }) }

// State says what the worker is doing.
func (w *Worker) State() events.WorkerState {
	c := &w.ctl
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.done:
		return events.WorkerStopped
	case c.stopping:
		return events.WorkerStopping
	case c.draining:
		return events.WorkerDraining
	case !c.running:
		return events.WorkerStarting
	case c.fetchCtx.Err() != nil:
		// A drain started by a signal, not by Drain.
		return events.WorkerDraining
	case w.paused.Load():
		return events.WorkerPaused
	}
	return events.WorkerRunning
}

// Started is when Run began, zero before.
func (w *Worker) Started() time.Time {
	w.ctl.mu.Lock()
	defer w.ctl.mu.Unlock()
	return w.ctl.started
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
