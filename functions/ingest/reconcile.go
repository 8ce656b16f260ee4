package ingest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/objstore"
)

const maxReportedKeys = 100

// Reconcile lists the input bucket (under prefix, if set) and heals every
// upload that would otherwise never end, with the configured staleness
// bound (see ReconcileWith).
func (h *Handler) Reconcile(ctx context.Context, prefix string) (events.ReconcileResult, error) {
	return h.ReconcileWith(ctx, prefix, h.cfg.ReconcileStaleAfter)
}

// HandleReconcile answers a reconcile request.
func (h *Handler) HandleReconcile(ctx context.Context, req events.ReconcileRequest) (events.ReconcileResult, error) {
	staleAfter := h.cfg.ReconcileStaleAfter
	if req.StaleAfter != "" {
		d, err := time.ParseDuration(req.StaleAfter)
		if err != nil || d < 0 {
			return events.ReconcileResult{}, requestErrorf("reconcile: stale_after %q is not a duration of zero or more, such as 20m (IMAGEPIPE_RECONCILE_STALE_AFTER)", req.StaleAfter)
		}
		staleAfter = d
	}
	return h.ReconcileWith(ctx, req.Prefix, staleAfter)
}

// ReconcileWith lists the input bucket (under prefix, if set) and heals
// each eligible object that would otherwise never end:
//
//   - No status record, or a record of another job older than the object
//     (an overwrite): its notification was lost, and it is queued. If its
//     output is already complete, its READY record was what got lost, and
//     READY is written back instead: nothing is converted twice.
//   - A status in a non-final state (QUEUED … UPLOADING) that has stood
//     still for longer than staleAfter, and whose job the queue no longer
//     holds: its job message was lost, and the same job is queued again.
//     A job in the queue is waiting, backing off, or on a replica, which
//     renews its status as it progresses; such a job is never touched.
//
// A re-convert's record is newer than its object, so it is not taken for
// an overwrite. Each job is the one ingest would have made (same identity,
// same event id), so if the notification does arrive, JetStream's
// duplicate window or the status record makes the second one harmless.
func (h *Handler) ReconcileWith(ctx context.Context, prefix string, staleAfter time.Duration) (events.ReconcileResult, error) {
	var res events.ReconcileResult
	if h.deps.Storage == nil || h.deps.Publish == nil {
		return res, errors.New("reconcile: no storage or publisher configured")
	}
	var stuck []stuck
	for _, p := range h.listPrefixes(prefix) {
		for obj, err := range h.deps.Storage.List(ctx, h.cfg.InputBucket, p) {
			if err != nil {
				return res, fmt.Errorf("reconcile: list %s/%s: %w", h.cfg.InputBucket, p, err)
			}
			res.Listed++
			out, err := h.reconcileObject(ctx, obj, staleAfter)
			if err != nil {
				return res, fmt.Errorf("reconcile %s/%s: %w", obj.Bucket, obj.Key, err)
			}
			switch {
			case out.stuck != nil:
				stuck = append(stuck, *out.stuck)
				continue
			case out.restored:
				res.Restored++
				res.Keys = appendKey(res.Keys, obj.Key)
				continue
			case len(out.msgs) == 0:
				continue
			}
			if err := h.deps.Publish(ctx, out.msgs...); err != nil {
				return res, fmt.Errorf("reconcile %s/%s: %w", obj.Bucket, obj.Key, err)
			}
			if out.msgs[0].Subject == events.SubjectFailed {
				res.Refused++
			} else {
				res.Queued++
			}
			res.Keys = appendKey(res.Keys, obj.Key)
		}
	}
	if h.deps.Jobs == nil {
		return res, nil
	}
	return res, h.healStuck(ctx, stuck, staleAfter, &res)
}

// listPrefixes narrows the listing to the configured prefixes, so a bucket
// with much else in it is not listed whole.
func (h *Handler) listPrefixes(prefix string) []string {
	if len(h.cfg.Prefixes) == 0 || prefix != "" {
		return []string{prefix}
	}
	return h.cfg.Prefixes
}

// objectOutcome is what reconcile decided for one object: messages to
// publish, a READY restored, or a stuck status to check against the queue.
type objectOutcome struct {
	msgs     []events.Message
	restored bool
	stuck    *stuck
}

func (h *Handler) reconcileObject(ctx context.Context, obj objstore.Object, staleAfter time.Duration) (objectOutcome, error) {
	c := candidate{Bucket: obj.Bucket, Key: obj.Key, Size: obj.Size, ETag: obj.ETag, VersionID: obj.VersionID, Metadata: obj.Metadata}
	// Skips are not counted here: they were counted when their
	// notification came, and a pass would count the whole bucket again.
	if v := h.judge(c); v.skip != "" {
		return objectOutcome{}, nil
	}
	st, found, err := h.statusOf(ctx, obj.Bucket, obj.Key)
	if err != nil {
		return objectOutcome{}, err
	}
	identity := events.ObjectIdentity(c.Bucket, c.Key, c.VersionID, c.ETag)
	ownJob := found && st.JobID == events.JobIDFor(identity)
	reconverted := found && !ownJob && !obj.LastModified.After(st.UpdatedAt)
	switch {
	case (ownJob || reconverted) && h.stale(st, staleAfter):
		return objectOutcome{stuck: &stuck{c: c, identity: identity, st: st}}, nil
	case ownJob || reconverted:
		return objectOutcome{}, nil
	}
	v, err := h.judgeStored(ctx, c)
	if err != nil {
		return objectOutcome{}, err
	}
	if !found && v.skip == "" && v.refuse == nil {
		restored, err := h.restoreReady(ctx, c, events.JobIDFor(identity), 0)
		if err != nil || restored {
			return objectOutcome{restored: restored}, err
		}
	}
	msgs, err := h.act(ctx, c, v, ReasonReconcile, h.log.With("bucket", c.Bucket, "key", c.Key))
	return objectOutcome{msgs: msgs}, err
}

// Lease grants the right to run one period's reconcile to one replica.
type Lease interface {
	// Acquire reports whether this replica holds the lease now.
	Acquire(ctx context.Context) (bool, error)
}

// RunReconcile reconciles every period, on whichever replica acquires the
// lease, until ctx is cancelled. The first pass waits a full period: at
// start nothing is lost yet that the stream does not still hold.
func (h *Handler) RunReconcile(ctx context.Context, every time.Duration, lease Lease) {
	if every <= 0 {
		return
	}
	for {
		// Jitter spreads replicas that started together, so the lease
		// is not contended at the same instant every period.
		wait := every + rand.N(every/10+1)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		ok, err := lease.Acquire(ctx)
		if err != nil {
			h.log.Warn("reconcile lease not acquired", "stage", "reconcile", "err", err)
			continue
		}
		if !ok {
			continue
		}
		start := h.now()
		res, err := h.Reconcile(ctx, "")
		if err != nil {
			h.log.Warn("reconcile failed", "stage", "reconcile", "err", err, "listed", res.Listed, "queued", res.Queued)
			continue
		}
		h.log.Info("reconciled", "stage", "reconcile", "listed", res.Listed, "queued", res.Queued, "refused", res.Refused,
			"requeued", res.Requeued, "restored", res.Restored, "keys", strings.Join(res.Keys, ","), "duration", h.now().Sub(start))
	}
}
