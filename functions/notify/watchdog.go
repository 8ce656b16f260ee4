package notify

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
)

// WatchdogBucket holds the watchdog lease.
const WatchdogBucket = "imagepipe_notify_watchdog"

// ConvertConsumer is the durable consumer on JOBS that convert replicas
// share, the one whose progress the watchdog watches.
const ConvertConsumer = "convert"

const (
	watchdogLeaseKey        = "lease"
	defaultWatchdogInterval = time.Minute
	watchdogSource          = "imagepipe/notify/watchdog"
)

// Watchdog raises an alert when the convert queue holds work that nothing
// has touched for StallAfter, and another when it moves again.
//
// Only one replica watches at a time. The lease is a key in a key-value
// bucket whose MaxAge is the lease's time to live: Create succeeds only for
// the first replica, the holder renews it with a revision-checked Update on
// every tick, and if the holder dies the key ages out and another replica's
// Create succeeds. A bucket was chosen over a MaxMsgs=1 stream because
// Create and Update give compare-and-set for free, which a stream only offers
// through expected-sequence headers, and because an operator can read the
// current holder with `nats kv get`.
//
// A handover must not repeat an alert, so the watchdog keeps no memory of
// its own: every tick it reads the last alert from the stream that stores
// imagepipe.alerts.stalled, and it publishes with a Nats-Msg-Id derived from
// the stall's start, so even two replicas that both believe they lead
// within JetStream's duplicate window publish one alert.
type Watchdog struct {
	js         jetstream.JetStream
	lease      jetstream.KeyValue
	log        *slog.Logger
	stallAfter time.Duration
	interval   time.Duration
	leaseTTL   time.Duration
	replicas   int
	holder     string
	stream     string
	consumer   string

	rev uint64 // lease revision while this replica holds it; owned by Run
}

// WatchdogOption adjusts a Watchdog.
type WatchdogOption func(*Watchdog)

// WithCheckInterval sets how often the queue is looked at (default one
// minute). The lease lives three intervals unless WithLeaseTTL says
// otherwise.
func WithCheckInterval(d time.Duration) WatchdogOption {
	return func(w *Watchdog) { w.interval = d }
}

// WithLeaseTTL sets how long a dead watchdog holds the lease before another
// replica takes over. It must be longer than the check interval.
func WithLeaseTTL(d time.Duration) WatchdogOption {
	return func(w *Watchdog) { w.leaseTTL = d }
}

// WithLeaseReplicas sets how many copies the lease bucket has when the
// watchdog creates it (default one); a cluster gives it as many as its
// streams, so losing a node does not lose the lease.
func WithLeaseReplicas(n int) WatchdogOption {
	return func(w *Watchdog) { w.replicas = n }
}

// NewWatchdog opens (or creates) the lease bucket. stallAfter of zero means
// DefaultStallAfter.
func NewWatchdog(ctx context.Context, js jetstream.JetStream, stallAfter time.Duration, log *slog.Logger, opts ...WatchdogOption) (*Watchdog, error) {
	w := &Watchdog{
		js:         js,
		log:        log,
		stallAfter: stallAfter,
		interval:   defaultWatchdogInterval,
		stream:     events.StreamJobs,
		consumer:   ConvertConsumer,
	}
	for _, o := range opts {
		o(w)
	}
	if w.log == nil {
		w.log = slog.New(slog.DiscardHandler)
	}
	if w.stallAfter <= 0 {
		w.stallAfter = DefaultStallAfter
	}
	if w.interval <= 0 {
		return nil, errors.New("watchdog: check interval must be positive")
	}
	if w.leaseTTL == 0 {
		w.leaseTTL = 3 * w.interval
	}
	if w.leaseTTL <= w.interval {
		return nil, fmt.Errorf("watchdog: lease TTL %s must be longer than the check interval %s", w.leaseTTL, w.interval)
	}
	host, _ := os.Hostname()
	var nonce [6]byte
	_, _ = rand.Read(nonce[:])
	w.holder = host + "/" + hex.EncodeToString(nonce[:])

	kv, err := openOrCreateKV(ctx, js, jetstream.KeyValueConfig{
		Bucket:      WatchdogBucket,
		Description: "imagepipe notify: which replica runs the stalled-queue watchdog",
		TTL:         w.leaseTTL,
		History:     1,
		Replicas:    max(w.replicas, 1),
	})
	if err != nil {
		return nil, fmt.Errorf("watchdog lease: %w", err)
	}
	w.lease = kv
	w.log = w.log.With("watchdog", w.stream+"/"+w.consumer)
	return w, nil
}

// Run checks the queue every interval until ctx ends, then hands the lease
// back so another replica need not wait for it to expire.
func (w *Watchdog) Run(ctx context.Context) {
	t := time.NewTicker(w.interval)
	defer t.Stop()
	defer w.release(ctx)
	for {
		w.tick(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (w *Watchdog) tick(ctx context.Context) {
	// A tick may run until the lease renewed at its start could expire; a
	// NATS outage must not wedge the loop beyond that.
	ctx, cancel := context.WithTimeout(ctx, w.leaseTTL-w.interval)
	defer cancel()
	if !w.holdLease(ctx) {
		return
	}
	if err := w.check(ctx); err != nil && ctx.Err() == nil {
		w.log.Warn("watchdog check failed", "err", err.Error())
	}
}

func (w *Watchdog) holdLease(ctx context.Context) bool {
	if w.rev != 0 {
		rev, err := w.lease.Update(ctx, watchdogLeaseKey, []byte(w.holder), w.rev)
		if err == nil {
			w.rev = rev
			return true
		}
		w.log.Warn("watchdog lease lost", "err", err.Error())
		w.rev = 0
	}
	rev, err := w.lease.Create(ctx, watchdogLeaseKey, []byte(w.holder))
	if errors.Is(err, jetstream.ErrKeyExists) {
		// A renewal whose answer was lost may still have landed; the lease
		// is then ours at a revision we did not see.
		if e, gerr := w.lease.Get(ctx, watchdogLeaseKey); gerr == nil && string(e.Value()) == w.holder {
			w.rev = e.Revision()
			return true
		}
		return false
	}
	if err != nil {
		if ctx.Err() == nil {
			w.log.Warn("watchdog lease unavailable", "err", err.Error())
		}
		return false
	}
	w.rev = rev
	w.log.Info("watchdog lease acquired", "holder", w.holder)
	return true
}

func (w *Watchdog) release(ctx context.Context) {
	if w.rev == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := w.lease.Delete(ctx, watchdogLeaseKey, jetstream.LastRevision(w.rev)); err != nil {
		w.log.Debug("watchdog lease not released; it will expire", "err", err.Error())
	}
	w.rev = 0
}

// queueState is what one look at the queue shows.
type queueState struct {
	depth        uint64
	lastActivity time.Time
	now          time.Time
}

// look reads the consumer and its stream. Progress is the latest of a
// delivery, an acknowledgement, a job's status update, and the arrival of
// the oldest job still queued: without the last, a job arriving in a queue
// idle for days would look stalled at once. Times are the server's, so replicas with skewed
// clocks agree on when a stall began.
func (w *Watchdog) look(ctx context.Context) (queueState, error) {
	s, err := w.js.Stream(ctx, w.stream)
	if err != nil {
		return queueState{}, fmt.Errorf("stream %s: %w", w.stream, err)
	}
	c, err := s.Consumer(ctx, w.consumer)
	if err != nil {
		return queueState{}, fmt.Errorf("consumer %s: %w", w.consumer, err)
	}
	ci, si := c.CachedInfo(), s.CachedInfo()
	st := queueState{depth: ci.NumPending + uint64(max(ci.NumAckPending, 0)), now: ci.TimeStamp}
	if st.now.IsZero() {
		st.now = time.Now()
	}
	for _, t := range []*time.Time{ci.Delivered.Last, ci.AckFloor.Last} {
		if t != nil && t.After(st.lastActivity) {
			st.lastActivity = *t
		}
	}
	if si.State.Msgs > 0 && si.State.FirstTime.After(st.lastActivity) {
		st.lastActivity = si.State.FirstTime
	}
	if t, ok := w.lastJobProgress(ctx); ok && t.After(st.lastActivity) {
		st.lastActivity = t
	}
	if st.lastActivity.IsZero() {
		st.lastActivity = ci.Created
	}
	return st, nil
}

// lastJobProgress is when a running job last recorded progress in the
// status bucket: a long conversion acknowledges nothing until it ends, but
// its status moves as it goes. Only the newest record is read, and only a
// running job's state counts: records of uploads queued behind a stuck
// replica must not hide the stall. Without the bucket, or the right to read
// it, deliveries and acks alone decide.
func (w *Watchdog) lastJobProgress(ctx context.Context) (time.Time, bool) {
	s, err := w.js.Stream(ctx, "KV_"+events.StatusBucket)
	if err != nil {
		return time.Time{}, false
	}
	m, err := s.GetLastMsgForSubject(ctx, "$KV."+events.StatusBucket+".>")
	if err != nil {
		return time.Time{}, false
	}
	var st events.Status
	if json.Unmarshal(m.Data, &st) != nil {
		return time.Time{}, false
	}
	switch st.State {
	case events.StateDownloading, events.StateInspecting, events.StateConverting, events.StateUploading:
		return m.Time, true
	}
	return time.Time{}, false
}

// lastAlert returns the newest alert about this queue, or nil.
func (w *Watchdog) lastAlert(ctx context.Context) (*events.Event, *QueueAlert, error) {
	name, err := w.js.StreamNameBySubject(ctx, events.SubjectStalled)
	if err != nil {
		return nil, nil, fmt.Errorf("no stream stores %s: %w", events.SubjectStalled, err)
	}
	s, err := w.js.Stream(ctx, name)
	if err != nil {
		return nil, nil, fmt.Errorf("stream %s: %w", name, err)
	}
	raw, err := s.GetLastMsgForSubject(ctx, events.SubjectStalled)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("last alert: %w", err)
	}
	ev, err := events.Decode(raw.Data)
	if err != nil {
		return nil, nil, fmt.Errorf("last alert: %w", err)
	}
	var a QueueAlert
	if err := json.Unmarshal(ev.Data, &a); err != nil {
		return nil, nil, fmt.Errorf("last alert %s: %w", ev.ID, err)
	}
	if a.Stream != w.stream || a.Consumer != w.consumer {
		return nil, nil, nil
	}
	return &ev, &a, nil
}

func (w *Watchdog) check(ctx context.Context) error {
	st, err := w.look(ctx)
	if err != nil {
		return err
	}
	prevEv, prev, err := w.lastAlert(ctx)
	if err != nil {
		return err
	}
	alerted := prevEv != nil && prevEv.Type == events.TypeStalled
	stalled := st.depth > 0 && st.now.Sub(st.lastActivity) >= w.stallAfter

	if alerted && (!stalled || !prev.LastActivity.Equal(st.lastActivity)) {
		moved := st.lastActivity
		if moved.Equal(prev.LastActivity) {
			// The queue emptied without a delivery or ack (purged by an
			// operator): it is no longer stuck as of now.
			moved = st.now
		}
		since := prev.LastActivity
		if err := w.publish(ctx, events.TypeQueueRecover, "queue-recovered", since, QueueAlert{
			Stream: w.stream, Consumer: w.consumer, QueueDepth: st.depth,
			IdleMinutes:  int64(moved.Sub(since) / time.Minute),
			LastActivity: moved, StalledSince: &since,
		}, st.now); err != nil {
			return err
		}
		alerted = false
	}
	if stalled && !alerted {
		return w.publish(ctx, events.TypeStalled, "queue-stalled", st.lastActivity, QueueAlert{
			Stream: w.stream, Consumer: w.consumer, QueueDepth: st.depth,
			IdleMinutes:  int64(st.now.Sub(st.lastActivity) / time.Minute),
			LastActivity: st.lastActivity,
		}, st.now)
	}
	return nil
}

// publish sends one alert. Its id, and so its Nats-Msg-Id, is derived from
// the stall's start, which every replica computes alike.
func (w *Watchdog) publish(ctx context.Context, typ, kind string, stallStart time.Time, a QueueAlert, now time.Time) error {
	id := fmt.Sprintf("%s.%s.%s.%d", kind, w.stream, w.consumer, stallStart.UnixNano())
	ev, err := events.New(id, typ, watchdogSource, w.stream+"/"+w.consumer, now, a)
	if err != nil {
		return err
	}
	body, err := json.Marshal(ev)
	if err != nil {
		return fmt.Errorf("encode %s: %w", typ, err)
	}
	ack, err := w.js.Publish(ctx, events.SubjectStalled, body, jetstream.WithMsgID(id))
	if err != nil {
		return fmt.Errorf("publish %s: %w", typ, err)
	}
	if ack.Duplicate {
		return nil
	}
	if typ == events.TypeStalled {
		w.log.Warn("convert queue stalled", "queue_depth", a.QueueDepth, "idle_minutes", a.IdleMinutes, "last_activity", a.LastActivity)
	} else {
		w.log.Info("convert queue moving again", "queue_depth", a.QueueDepth, "stalled_minutes", a.IdleMinutes)
	}
	return nil
}
