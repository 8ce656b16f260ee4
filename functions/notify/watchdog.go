package notify

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/lease"
	"github.com/imagepipe/imagepipe/internal/orphan"
)

const (
	watchdogLeaseKey        = "lease"
	defaultWatchdogInterval = time.Minute
)

// Watchdog raises an alert when the convert queue holds work that nothing
// has touched for StallAfter, and another when it moves again.
//
// Only one replica watches at a time: the one holding the watchdog's lease
// (package lease), which it renews on every tick; if it dies, the lease
// ages out and another replica takes it over.
//
// A handover must not repeat an alert, so the watchdog keeps no memory of
// its own: every tick it reads the last alert from the stream that stores
// imagepipe.alerts.stalled, and it publishes with a Nats-Msg-Id derived from
// the stall's start, so even two replicas that both believe they lead
// within JetStream's duplicate window publish one alert.
type Watchdog struct {
	js         jetstream.JetStream
	lease      *lease.Lease
	log        *slog.Logger
	stallAfter time.Duration
	interval   time.Duration
	leaseTTL   time.Duration
	replicas   int
	stream     string
	consumer   string

	// orphanBound, when set, is the staleness bound of package orphan:
	// each tick also counts the uploads that wait with no job behind them.
	orphanBound time.Duration
	// recordOrphans receives each count, and ok=false once this replica
	// no longer counts (it lost the lease, or could not look).
	recordOrphans func(n int, ok bool)
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

// WithOrphans makes every check also count the uploads whose status stood
// still for longer than staleAfter in a non-final state, their job gone
// from the queue (orphan.Find, the judgement reconcile heals by). They
// count as work the queue holds: a stall alert fires when nothing moved
// for StallAfter while they wait, even with the queue empty, and names
// them. record, if not nil, receives each count (ok=false when this
// replica stops counting), for a metric.
func WithOrphans(staleAfter time.Duration, record func(n int, ok bool)) WatchdogOption {
	return func(w *Watchdog) { w.orphanBound, w.recordOrphans = staleAfter, record }
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
		consumer:   events.ConsumerConvert,
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
	w.log = w.log.With("watchdog", w.stream+"/"+w.consumer)
	l, err := lease.Open(ctx, js, lease.Bucket{
		Name:        events.WatchdogBucket,
		Description: "imagepipe notify: which replica runs the stalled-queue watchdog",
		TTL:         w.leaseTTL,
		Replicas:    w.replicas,
	}, watchdogLeaseKey, "watchdog", w.log)
	if err != nil {
		return nil, err
	}
	w.lease = l
	return w, nil
}

// Run checks the queue every interval until ctx ends, then hands the lease
// back so another replica need not wait for it to expire.
func (w *Watchdog) Run(ctx context.Context) {
	t := time.NewTicker(w.interval)
	defer t.Stop()
	defer w.lease.Release(ctx)
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
	if !w.lease.Hold(ctx) {
		w.countedOrphans(orphan.Count{}, false)
		return
	}
	if err := w.check(ctx); err != nil && ctx.Err() == nil {
		w.countedOrphans(orphan.Count{}, false)
		w.log.Warn("watchdog check failed", "err", err.Error())
	}
}

func (w *Watchdog) countedOrphans(c orphan.Count, ok bool) {
	if w.recordOrphans != nil && w.orphanBound > 0 {
		w.recordOrphans(c.Uploads, ok)
	}
}

// queueState is what one look at the queue shows.
type queueState struct {
	depth        uint64
	lastActivity time.Time
	now          time.Time
	orphans      orphan.Count
}

// stallStart is when the work waiting last moved: the queue's last
// activity while it holds jobs, and the oldest upload that lost its job
// if that stands still since earlier. An empty queue's activity says
// nothing about uploads that have no job in it: it even goes back in time
// when the lost job's message goes. The start stays the same while the
// same stall lasts, which is what keeps an alert from repeating.
func (st queueState) stallStart() time.Time {
	switch {
	case st.orphans.Uploads == 0:
		return st.lastActivity
	case st.depth == 0, st.orphans.Since.Before(st.lastActivity):
		return st.orphans.Since
	}
	return st.lastActivity
}

// waiting is the work that should be moving: jobs in the queue, and
// uploads that wait for a job the queue lost.
func (st queueState) waiting() bool { return st.depth > 0 || st.orphans.Uploads > 0 }

// look reads the consumer and its stream. Progress is the latest of a
// delivery, an acknowledgement, a job's status update, and the arrival of
// the oldest job still queued: without the last, a job arriving in a queue
// idle for days would look stalled at once. Times are the server's, so
// replicas with skewed clocks agree on when a stall began.
//
// Uploads with no job are counted before the queue is read: a job lost in
// between then shows as an empty queue with no upload missing yet, which
// the next look completes, never as a job both queued and missing.
func (w *Watchdog) look(ctx context.Context) (queueState, error) {
	s, err := w.js.Stream(ctx, w.stream)
	if err != nil {
		return queueState{}, fmt.Errorf("stream %s: %w", w.stream, err)
	}
	c, err := s.Consumer(ctx, w.consumer)
	if err != nil {
		return queueState{}, fmt.Errorf("consumer %s: %w", w.consumer, err)
	}
	st := queueState{now: c.CachedInfo().TimeStamp}
	if st.now.IsZero() {
		st.now = time.Now()
	}
	ci, si := c.CachedInfo(), s.CachedInfo()
	if w.orphanBound > 0 {
		st.orphans = w.countOrphans(ctx, st.now)
		if si, err = s.Info(ctx); err != nil {
			return queueState{}, fmt.Errorf("stream %s: %w", w.stream, err)
		}
		if ci, err = c.Info(ctx); err != nil {
			return queueState{}, fmt.Errorf("consumer %s: %w", w.consumer, err)
		}
	}
	st.depth = ci.NumPending + uint64(max(ci.NumAckPending, 0))
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

// orphanCountTimeout bounds one count, so that a status bucket the
// watchdog may not read (its NATS user lacks the rights) costs the count,
// not the queue's own check.
const orphanCountTimeout = 20 * time.Second

// countOrphans counts the uploads that wait with no job behind them. A
// count that fails is logged and taken as none: the queue's own check goes
// on without it.
func (w *Watchdog) countOrphans(ctx context.Context, now time.Time) orphan.Count {
	ctx, cancel := context.WithTimeout(ctx, min(orphanCountTimeout, w.interval))
	defer cancel()
	// The server's clock, as for the rest: status times are the writers',
	// and the bound leaves a minute for skew between them.
	c, err := orphan.Find(ctx, w.js, now, w.orphanBound)
	if err != nil {
		w.countedOrphans(orphan.Count{}, false)
		w.log.Warn("uploads with no job not counted; check the notify user may read the status bucket and JOBS", "err", err.Error())
		return orphan.Count{}
	}
	w.countedOrphans(c, true)
	if c.Uploads > 0 {
		w.log.Warn("uploads wait with no job in the queue; reconcile queues them again", "orphaned", c.Uploads,
			"oldest_since", c.Since, "keys", strings.Join(c.Keys, ","))
	}
	return c
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
	start := st.stallStart()
	stalled := st.waiting() && st.now.Sub(start) >= w.stallAfter

	switch {
	case alerted && stalled && start.Before(prev.LastActivity):
		// The same stall, found to reach further back: an upload lost its
		// job while the queue stood still. Nothing moved, so there is no
		// recovery to report, only a new alert that names the upload.
		alerted = false
	case alerted && (!stalled || !prev.LastActivity.Equal(start)):
		moved := start
		if moved.Equal(prev.LastActivity) {
			// The queue emptied without a delivery or ack (purged by an
			// operator): it is no longer stuck as of now.
			moved = st.now
		}
		since := prev.LastActivity
		if err := w.publish(ctx, events.TypeQueueRecover, "queue-recovered", since, QueueAlert{
			Stream: w.stream, Consumer: w.consumer, QueueDepth: st.depth,
			IdleMinutes:  int64(moved.Sub(since) / time.Minute),
			LastActivity: moved, StalledSince: &since, Orphaned: st.orphans.Uploads,
		}, st.now); err != nil {
			return err
		}
		alerted = false
	}
	if stalled && !alerted {
		return w.publish(ctx, events.TypeStalled, "queue-stalled", start, QueueAlert{
			Stream: w.stream, Consumer: w.consumer, QueueDepth: st.depth,
			IdleMinutes:  int64(st.now.Sub(start) / time.Minute),
			LastActivity: start, Orphaned: st.orphans.Uploads, OrphanedKeys: st.orphans.Keys,
		}, st.now)
	}
	return nil
}

// publish sends one alert. Its id, and so its Nats-Msg-Id, is derived from
// the stall's start, which every replica computes alike.
func (w *Watchdog) publish(ctx context.Context, typ, kind string, stallStart time.Time, a QueueAlert, now time.Time) error {
	id := fmt.Sprintf("%s.%s.%s.%d", kind, w.stream, w.consumer, stallStart.UnixNano())
	ev, err := events.New(id, typ, events.SourceWatchdog, w.stream+"/"+w.consumer, now, a)
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
		w.log.Warn("convert queue stalled", "queue_depth", a.QueueDepth, "orphaned", a.Orphaned, "idle_minutes", a.IdleMinutes, "last_activity", a.LastActivity)
	} else {
		w.log.Info("convert queue moving again", "queue_depth", a.QueueDepth, "stalled_minutes", a.IdleMinutes)
	}
	return nil
}
