package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
)

// ErrNothingToCancel means the input has no job that could be cancelled.
var ErrNothingToCancel = errors.New("nothing to cancel")

// Cancel stops the conversion of bucket/key wherever it is.
//
// A running job is cancelled by the convert replica running it. A job
// still in the queue has no owner to ask, so its status record is set to
// CANCELLED, compare-and-swap on the revision read, and convert, which
// reads the record before it starts a job, skips a job whose record is
// CANCELLED with the same job id. The swap fails if the job moved on in
// between, most likely because a replica just took it, and the request
// goes out again.
func (c *Client) Cancel(ctx context.Context, kv jetstream.KeyValue, bucket, key string) (events.CancelResult, error) {
	res := events.CancelResult{Bucket: bucket, Key: key}
	skey := events.StatusKey(bucket, key)
	const tries = 3
	for try := 1; ; try++ {
		replies, err := gatherAs[events.CancelReply](ctx, c, []string{events.FunctionConvert}, events.VerbCancel, events.ControlRequest{Bucket: bucket, Key: key})
		if err != nil && !errors.Is(err, ErrNoReplica) && len(replies) == 0 {
			return res, err
		}
		for _, r := range replies {
			if len(r.Cancelled) > 0 {
				res.Running = append(res.Running, r)
				res.JobID = r.Cancelled[0].ID
			}
		}
		if len(res.Running) > 0 {
			return res, nil
		}

		entry, err := kv.Get(ctx, skey)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return res, fmt.Errorf("%w: no image %s/%s is known", ErrNothingToCancel, bucket, key)
		}
		if err != nil {
			return res, fmt.Errorf("read status of %s/%s: %w", bucket, key, err)
		}
		var st events.Status
		if err := json.Unmarshal(entry.Value(), &st); err != nil {
			return res, fmt.Errorf("decode status of %s/%s: %w", bucket, key, err)
		}
		res.JobID = st.JobID
		if st.State.Terminal() {
			return res, fmt.Errorf("%w: %s/%s is already %s", ErrNothingToCancel, bucket, key, st.State)
		}
		queued := st.State == events.StateQueued || st.State == events.StateUploaded
		// A record that says running with no replica owning it is a job
		// whose replica died: it waits for redelivery like a queued one.
		if queued || try == tries {
			st.State = events.StateCancelled
			st.Percent = 0
			st.Message = "cancelled by an operator before it started"
			st.Suggestion = "upload the image again to convert it after all"
			st.UpdatedAt = time.Now().UTC()
			b, err := json.Marshal(st)
			if err != nil {
				return res, err
			}
			if _, err := kv.Update(ctx, skey, b, entry.Revision()); err == nil {
				res.Queued = true
				return res, nil
			} else if try == tries {
				return res, fmt.Errorf("cancel %s/%s: its state keeps changing: %w", bucket, key, err)
			}
		}
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}
