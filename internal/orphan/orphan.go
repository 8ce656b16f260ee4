package orphan

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
)

// NonFinal reports whether a status says a job should be alive: queued or
// on a replica.
func NonFinal(s events.State) bool {
	switch s {
	case events.StateQueued, events.StateDownloading, events.StateInspecting, events.StateConverting, events.StateUploading:
		return true
	}
	return false
}

// Stale reports whether st has stood still for longer than staleAfter in
// a state that expects a job behind it. A live job renews its status as it
// progresses, and a job waiting out its back-off is still in the queue, so
// staleness alone proves nothing: see Orphaned.
func Stale(st events.Status, now time.Time, staleAfter time.Duration) bool {
	return NonFinal(st.State) && now.Sub(st.UpdatedAt) > staleAfter
}

// Orphaned reports whether st is stale and its job is not among held, the
// job ids the queue holds (JobIDs): no replica works on it, no delivery
// or redelivery will come, and only a new job ends it. Read the statuses
// before the queue: a job that finishes in between has then already left
// its mark on its status, and a re-read of that status tells.
func Orphaned(st events.Status, held map[string]bool, now time.Time, staleAfter time.Duration) bool {
	return Stale(st, now, staleAfter) && !held[st.JobID]
}

// JobIDs returns the job id of every message the JOBS stream holds. JOBS is
// a work queue: it holds exactly the jobs not yet acknowledged, waiting,
// backing off or on a replica, and no consumer beside convert's may read
// it, so messages are fetched by sequence, each get skipping the gaps
// acknowledged jobs left.
func JobIDs(ctx context.Context, js jetstream.JetStream) (map[string]bool, error) {
	stream, err := js.Stream(ctx, events.StreamJobs)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", events.StreamJobs, err)
	}
	info, err := stream.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("stream %s: %w", events.StreamJobs, err)
	}
	ids := map[string]bool{}
	for seq := info.State.FirstSeq; seq > 0 && seq <= info.State.LastSeq; {
		m, err := stream.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(events.SubjectConvertJob))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("stream %s message %d: %w", events.StreamJobs, seq, err)
		}
		if id := JobIDOf(m.Data); id != "" {
			ids[id] = true
		}
		seq = m.Sequence + 1
	}
	return ids, nil
}

// JobIDOf is the job id of a job message, "" if it is not one.
func JobIDOf(data []byte) string {
	ev, err := events.Decode(data)
	if err != nil {
		return ""
	}
	var job events.ConvertJob
	if err := ev.DecodeData(events.TypeConvertJob, &job); err != nil {
		return ""
	}
	return job.JobID
}

// maxKeys bounds the keys a Count names; the number counts them all.
const maxKeys = 20

// Count is what one look at the status bucket and the queue found.
type Count struct {
	// Uploads is the number of orphaned uploads.
	Uploads int `json:"uploads"`
	// Keys names the first of them, "bucket/key", oldest first.
	Keys []string `json:"keys,omitempty"`
	// Since is when the oldest of them last moved; zero when there are none.
	Since time.Time `json:"since,omitzero"`
}

// Find reads every status record, then the queue, and counts the orphaned
// uploads: the same judgement reconcile acts on, so that what is counted
// here is what the next reconcile pass heals.
func Find(ctx context.Context, js jetstream.JetStream, now time.Time, staleAfter time.Duration) (Count, error) {
	kv, err := js.KeyValue(ctx, events.StatusBucket)
	if err != nil {
		return Count{}, fmt.Errorf("status bucket %s: %w", events.StatusBucket, err)
	}
	stale, err := staleRecords(ctx, kv, now, staleAfter)
	if err != nil || len(stale) == 0 {
		return Count{}, err
	}
	held, err := JobIDs(ctx, js)
	if err != nil {
		return Count{}, fmt.Errorf("read the job queue: %w", err)
	}
	var found []events.Status
	for key, st := range stale {
		if !Orphaned(st, held, now, staleAfter) {
			continue
		}
		// Read again: a job that finished or moved after the first read,
		// and so left the queue before it was read, is not an orphan.
		cur, err := record(ctx, kv, key)
		if err != nil {
			return Count{}, err
		}
		if cur.JobID == st.JobID && cur.State == st.State && cur.UpdatedAt.Equal(st.UpdatedAt) {
			found = append(found, st)
		}
	}
	return count(found), nil
}

func count(found []events.Status) Count {
	slices.SortFunc(found, func(a, b events.Status) int { return a.UpdatedAt.Compare(b.UpdatedAt) })
	c := Count{Uploads: len(found)}
	for i, st := range found {
		if i == 0 {
			c.Since = st.UpdatedAt
		}
		if i < maxKeys {
			c.Keys = append(c.Keys, st.Bucket+"/"+st.Key)
		}
	}
	return c
}

// staleRecords reads the current value of every key and keeps the stale
// ones, by key.
func staleRecords(ctx context.Context, kv jetstream.KeyValue, now time.Time, staleAfter time.Duration) (map[string]events.Status, error) {
	w, err := kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("read status records: %w", err)
	}
	defer func() { _ = w.Stop() }()
	out := map[string]events.Status{}
	for {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("read status records: %w", ctx.Err())
		case e, ok := <-w.Updates():
			if !ok {
				return nil, errors.New("read status records: the watch ended early")
			}
			if e == nil {
				return out, nil // every current value has been delivered
			}
			var st events.Status
			if json.Unmarshal(e.Value(), &st) == nil && Stale(st, now, staleAfter) {
				out[e.Key()] = st
			}
		}
	}
}

func record(ctx context.Context, kv jetstream.KeyValue, key string) (events.Status, error) {
	e, err := kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return events.Status{}, nil
	}
	if err != nil {
		return events.Status{}, fmt.Errorf("read status %s: %w", key, err)
	}
	var st events.Status
	_ = json.Unmarshal(e.Value(), &st)
	return st, nil
}
