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

// Reconcile lists the input bucket (under prefix, if set) and queues every
// eligible object that no notification brought in: events are hints, and
// MinIO can lose one (its in-memory queue on a crash, a full queue store,
// a target down at start). An object is queued when it has no status
// record, or when its record is of another job and older than the object:
// an overwrite whose notification was lost. A re-convert's record is newer
// than its object, so it is left alone.
//
// The job is the one the notification would have made (same identity, same
// event id), so if the notification does arrive, JetStream's duplicate
// window or the status record makes the second one harmless.
func (h *Handler) Reconcile(ctx context.Context, prefix string) (events.ReconcileResult, error) {
	var res events.ReconcileResult
	if h.deps.Storage == nil || h.deps.Publish == nil {
		return res, errors.New("reconcile: no storage or publisher configured")
	}
	for _, p := range h.listPrefixes(prefix) {
		for obj, err := range h.deps.Storage.List(ctx, h.cfg.InputBucket, p) {
			if err != nil {
				return res, fmt.Errorf("reconcile: list %s/%s: %w", h.cfg.InputBucket, p, err)
			}
			res.Listed++
			msgs, err := h.reconcileObject(ctx, obj)
			if err != nil {
				return res, fmt.Errorf("reconcile %s/%s: %w", obj.Bucket, obj.Key, err)
			}
			if len(msgs) == 0 {
				continue
			}
			if err := h.deps.Publish(ctx, msgs...); err != nil {
				return res, fmt.Errorf("reconcile %s/%s: %w", obj.Bucket, obj.Key, err)
			}
			if msgs[0].Subject == events.SubjectFailed {
				res.Refused++
			} else {
				res.Queued++
			}
			if len(res.Keys) < maxReportedKeys {
				res.Keys = append(res.Keys, obj.Key)
			}
		}
	}
	return res, nil
}

// listPrefixes narrows the listing to the configured prefixes, so a bucket
// with much else in it is not listed whole.
func (h *Handler) listPrefixes(prefix string) []string {
	if len(h.cfg.Prefixes) == 0 || prefix != "" {
		return []string{prefix}
	}
	return h.cfg.Prefixes
}

func (h *Handler) reconcileObject(ctx context.Context, obj objstore.Object) ([]events.Message, error) {
	c := candidate{Bucket: obj.Bucket, Key: obj.Key, Size: obj.Size, ETag: obj.ETag, VersionID: obj.VersionID, Metadata: obj.Metadata}
	// Skips are not counted here: they were counted when their
	// notification came, and a pass would count the whole bucket again.
	if v := h.judge(c); v.skip != "" {
		return nil, nil
	}
	st, found, err := h.statusOf(ctx, obj.Bucket, obj.Key)
	if err != nil {
		return nil, err
	}
	identity := events.ObjectIdentity(c.Bucket, c.Key, c.VersionID, c.ETag)
	if found && (st.JobID == events.JobIDFor(identity) || !obj.LastModified.After(st.UpdatedAt)) {
		return nil, nil
	}
	v, err := h.judgeStored(ctx, c)
	if err != nil {
		return nil, err
	}
	return h.act(ctx, c, v, "reconcile", h.log.With("bucket", c.Bucket, "key", c.Key))
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
			"keys", strings.Join(res.Keys, ","), "duration", h.now().Sub(start))
	}
}
