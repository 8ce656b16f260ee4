package natsrt

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
)

// Delivery tells a handler which attempt this is.
type Delivery struct {
	Attempt     int // 1 on first delivery
	MaxAttempts int
}

// WillRetry reports whether the runtime will redeliver after err.
func (d Delivery) WillRetry(err error) bool { return failure.WillRetry(err, d.Attempt, d.MaxAttempts) }

// Handler processes one message's payload and returns the events to
// publish. A nil error acks; a permanent error terminates the message; any
// other error redelivers it after the back-off for this attempt. Events are
// published in every case, so a handler can report a failure and still ask
// for a retry.
type Handler func(ctx context.Context, data []byte, d Delivery) ([]events.Message, error)

// Binding is one durable consumer and how to run it.
type Binding struct {
	Stream        string
	Durable       string
	FilterSubject string
	// Concurrency is how many messages run at once; never more are fetched.
	Concurrency int
	// AckWait is how long a silent worker keeps a message; the runtime
	// sends InProgress at a third of it, so only a dead worker loses one.
	AckWait     time.Duration
	MaxAttempts int
	// Backoff[i] is the delay before attempt i+2; the last entry repeats.
	Backoff []time.Duration
	// Describe, if set, names the input a message's job works on, so that
	// an operator can cancel it by bucket and key. It must not fail: an
	// undecodable message gets the zero JobRef.
	Describe func(data []byte) events.JobRef
}

func (b Binding) consumerConfig() jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       b.Durable,
		FilterSubject: b.FilterSubject,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       b.AckWait,
		// The runtime gives up after MaxAttempts itself. The server's limit
		// only catches a message that kills its worker every time, and
		// leaves room for deliveries that end without an outcome: a stop
		// that hands a job back, or a replica that died, must not use up
		// the last attempt and strand the job in the queue.
		MaxDeliver: 2 * b.MaxAttempts,
		// Room for every replica's workers; each fetches one at a time.
		MaxAckPending: 1000,
		DeliverPolicy: jetstream.DeliverAllPolicy,
	}
}

func (b Binding) delay(attempt int) time.Duration {
	if len(b.Backoff) == 0 {
		return 5 * time.Second
	}
	i := attempt - 1
	if i >= len(b.Backoff) {
		i = len(b.Backoff) - 1
	}
	if i < 0 {
		i = 0
	}
	return b.Backoff[i]
}

// Worker runs a handler on a consumer.
type Worker struct {
	js      jetstream.JetStream
	binding Binding
	handle  Handler
	log     *slog.Logger

	paused   atomic.Bool
	inFlight atomic.Int64
	ctl      control
	also     []func(jobCtx context.Context)
}

// Also has Run, once its own messages are done, wait for f as well: for
// work the function started outside its consumer, such as ingest's
// imports. f gets Run's job context, which a stop or a second signal
// cancels, and must return soon after it is. Call it before Run.
func (w *Worker) Also(f func(jobCtx context.Context)) { w.also = append(w.also, f) }

// NewWorker creates or updates the durable consumer and returns a worker
// bound to it. Creating is idempotent: every replica calls it at start.
// While JetStream cannot answer yet it waits, for as long as ctx lasts.
func NewWorker(ctx context.Context, js jetstream.JetStream, b Binding, h Handler, log *slog.Logger) (*Worker, error) {
	if b.Concurrency < 1 {
		b.Concurrency = 1
	}
	if b.AckWait <= 0 {
		b.AckWait = time.Minute
	}
	if b.MaxAttempts < 1 {
		b.MaxAttempts = 4
	}
	// A loaded cluster may take a while to answer; the function waits
	// for it rather than exiting (WaitJetStream).
	what := fmt.Sprintf("create consumer %s on %s", b.Durable, b.Stream)
	if err := WaitJetStream(ctx, js.Conn(), log, what, func(ctx context.Context) error {
		_, err := js.CreateOrUpdateConsumer(ctx, b.Stream, b.consumerConfig())
		return err
	}); err != nil {
		return nil, err
	}
	return &Worker{js: js, binding: b, handle: h, log: log.With("consumer", b.Durable)}, nil
}

// InFlight is the number of messages being handled now.
func (w *Worker) InFlight() int64 { return w.inFlight.Load() }

// Run fetches and handles messages until ctx is cancelled, then waits for
// in-flight messages to finish. Handlers run under jobCtx, not ctx, so that
// cancelling ctx drains instead of aborting; cancel jobCtx to abort them.
func (w *Worker) Run(ctx, jobCtx context.Context) error {
	ctx, jobCtx = w.begin(ctx, jobCtx)
	defer w.end()
	var cons jetstream.Consumer
	err := WaitJetStream(ctx, w.js.Conn(), w.log, "bind consumer "+w.binding.Durable, func(ctx context.Context) error {
		var err error
		cons, err = w.js.Consumer(ctx, w.binding.Stream, w.binding.Durable)
		return err
	})
	if err != nil && ctx.Err() == nil {
		return err
	}
	// A drain that came while the consumer was still being bound ends the
	// fetching before it starts; the work added with Also is waited for
	// all the same.
	var wg sync.WaitGroup
	if err == nil {
		for range w.binding.Concurrency {
			wg.Go(func() { w.loop(ctx, jobCtx, cons) })
		}
	}
	wg.Wait()
	for _, f := range w.also {
		f(jobCtx)
	}
	return nil
}

func (w *Worker) loop(ctx, jobCtx context.Context, cons jetstream.Consumer) {
	for ctx.Err() == nil {
		if w.paused.Load() {
			sleep(ctx, 200*time.Millisecond)
			continue
		}
		// One message per worker slot: a replica never holds a message it
		// cannot start, which another replica could be running.
		fctx, done := w.fetchContext(ctx)
		msg, err := cons.Next(jetstream.FetchContext(fctx))
		done()
		if err != nil {
			if fctx.Err() != nil {
				continue // drained, stopped or paused: the loop decides
			}
			if !errors.Is(err, nats.ErrTimeout) && !errors.Is(err, context.DeadlineExceeded) {
				w.log.Warn("fetch failed; retrying", "err", err)
				sleep(ctx, time.Second)
			}
			continue
		}
		w.inFlight.Add(1)
		w.process(jobCtx, msg)
		w.inFlight.Add(-1)
	}
}

func (w *Worker) process(jobCtx context.Context, msg jetstream.Msg) {
	d := Delivery{Attempt: 1, MaxAttempts: w.binding.MaxAttempts}
	if md, err := msg.Metadata(); err == nil {
		d.Attempt = int(md.NumDelivered)
	}

	ctx, j := w.track(jobCtx, msg.Data(), d)
	stop := w.keepAlive(msg)
	out, herr := w.handle(ctx, msg.Data(), d)
	stop()
	w.finish(j, w.settle(ctx, jobCtx, msg, d, out, herr), out, herr)
}

// settle decides ack, nak or term for a handled message and returns what
// it did. It is the one place that decision is made.
func (w *Worker) settle(ctx, jobCtx context.Context, msg jetstream.Msg, d Delivery, out []events.Message, herr error) Outcome {
	cancelled := errors.Is(context.Cause(ctx), failure.ErrCancelled)
	if herr != nil && jobCtx.Err() != nil && !cancelled {
		// A stop cut the job short: whatever the handler made of the
		// cancellation, the job is not at fault and no attempt should be
		// spent on it. Its events would report a failure that did not
		// happen, so they stay unpublished. A nak without delay hands it
		// to another replica now instead of after the back-off.
		w.log.Info("job aborted by stop; handing it back", "attempt", d.Attempt)
		w.nak(msg, 0)
		return OutcomeAborted
	}
	// The work is done whatever happens to the contexts now: publish and
	// acknowledge it even while stopping.
	pctx := context.WithoutCancel(ctx)
	if err := Publish(pctx, w.js, out...); err != nil {
		// Nothing is acked until its events are out: redeliver.
		w.log.Warn("publish failed; message will be redelivered", "err", err, "attempt", d.Attempt)
		w.nak(msg, w.binding.delay(d.Attempt))
		return OutcomeRetried
	}
	switch {
	case herr == nil:
		w.ack(pctx, msg)
		return OutcomeAcked
	case cancelled:
		w.term(pctx, msg, failure.ErrCancelled.Error())
		return OutcomeCancelled
	case failure.IsPermanent(herr):
		w.term(pctx, msg, herr.Error())
		return OutcomeTerminated
	case !d.WillRetry(herr):
		w.term(pctx, msg, fmt.Sprintf("gave up after %d attempts: %v", d.Attempt, herr))
		return OutcomeTerminated
	}
	delay := w.binding.delay(d.Attempt)
	w.log.Info("retrying later", "err", herr, "attempt", d.Attempt, "delay", delay)
	w.nak(msg, delay)
	return OutcomeRetried
}

// ackTry bounds one attempt to have an ack confirmed.
const ackTry = 5 * time.Second

// ack acknowledges a finished message and waits for the server to confirm
// it. While the stream's leader changes nobody answers for a few seconds,
// and an ack lost then makes the server hand the finished job out again;
// so it is confirmed (see confirm).
func (w *Worker) ack(ctx context.Context, msg jetstream.Msg) {
	w.confirm(ctx, "ack", msg.DoubleAck)
}

// term ends a message for good, confirmed as an ack is: a term lost to a
// leader change or a restart hands the job out again, and although its
// next delivery only reports the recorded outcome again, it is one that
// need not happen. jetstream.Msg has no confirmed term; the server
// answers one sent as a request on the message's reply subject, as it
// answers DoubleAck's.
func (w *Worker) term(ctx context.Context, msg jetstream.Msg, reason string) {
	if len(reason) > 200 {
		reason = reason[:200]
	}
	w.confirm(ctx, "term", func(ctx context.Context) error {
		_, err := w.js.Conn().RequestWithContext(ctx, msg.Reply(), []byte("+TERM "+reason))
		return err
	})
}

// confirm sends what settles a message until the server confirms it: again,
// with back-off, while no server answers, until AckWait has passed (the
// server has redelivered the message by then, and the next delivery finds
// the work done). It logs once, with the outcome.
func (w *Worker) confirm(ctx context.Context, what string, send func(context.Context) error) {
	deadline := time.Now().Add(w.binding.AckWait)
	backoff := 100 * time.Millisecond
	for tries := 1; ; tries++ {
		actx, cancel := context.WithTimeout(ctx, min(ackTry, max(time.Until(deadline), time.Millisecond)))
		err := send(actx)
		cancel()
		switch {
		case err == nil && tries > 1:
			w.log.Info(what+" confirmed after the server did not answer", "tries", tries)
			return
		case err == nil:
			return
		case !ackMayPass(err) || time.Until(deadline) <= backoff:
			w.log.Warn(what+" failed; message may be redelivered", "err", err, "tries", tries)
			return
		}
		sleep(ctx, backoff)
		backoff = min(2*backoff, 2*time.Second)
	}
}

// ackMayPass reports whether an ack failed only because no server answered
// in time, as while a stream elects a new leader or a server restarts.
func ackMayPass(err error) bool {
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, nats.ErrNoResponders)
}

func (w *Worker) nak(msg jetstream.Msg, delay time.Duration) {
	if err := msg.NakWithDelay(delay); err != nil {
		w.log.Warn("nak failed; message will be redelivered after ack wait", "err", err)
	}
}

// keepAlive tells the server the message is still being worked on, so a
// long conversion is never handed to a second worker.
func (w *Worker) keepAlive(msg jetstream.Msg) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(w.binding.AckWait / 3)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if err := msg.InProgress(); err != nil {
					w.log.Warn("in-progress signal failed", "err", err)
				}
			}
		}
	})
	return func() { close(done); wg.Wait() }
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}
