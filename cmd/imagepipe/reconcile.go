package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/ingest"
)

// runReconcile asks an ingest replica to list the input bucket and heal
// every upload that would otherwise never end, and prints what it did.
func runReconcile(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("reconcile", flag.ContinueOnError)
	prefix := fs.String("prefix", "", "reconcile only keys under this prefix")
	staleAfter := fs.String("stale-after", os.Getenv("IMAGEPIPE_RECONCILE_STALE_AFTER"),
		"how long a non-final status may stand still, its job gone from the queue, before the job is queued again (default: the replica's IMAGEPIPE_RECONCILE_STALE_AFTER)")
	timeout := fs.Duration("timeout", 10*time.Minute, "how long to wait for the pass to finish (it goes on if this runs out)")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "Usage: imagepipe reconcile [--prefix P] [--stale-after D]\n\n"+
			"Queues every eligible object in the input bucket that has no status record,\n"+
			"as if its lost notification had arrived; writes READY back for one whose\n"+
			"output is complete; and queues again the job of every upload whose status\n"+
			"stood still in a non-final state while the job queue no longer holds it.")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args, stdout); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return usageError{"reconcile takes no arguments"}
	}
	if *staleAfter != "" {
		if d, err := time.ParseDuration(*staleAfter); err != nil || d < 0 {
			return usageError{fmt.Sprintf("--stale-after (IMAGEPIPE_RECONCILE_STALE_AFTER) %q is not a duration of zero or more, such as 20m", *staleAfter)}
		}
	}
	var res events.ReconcileResult
	req := events.ReconcileRequest{Prefix: *prefix, StaleAfter: *staleAfter}
	if err := ctlRequest(ctx, events.SubjectReconcile, req, &res, *timeout); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "listed %d, queued %d, refused %d\n", res.Listed, res.Queued, res.Refused)
	fmt.Fprintf(stdout, "healed: requeued %d (status stood still, job lost from the queue), restored %d (READY from a complete output)\n",
		res.Requeued, res.Restored)
	if len(res.Keys) > 0 {
		fmt.Fprintf(stdout, "  %s\n", strings.Join(res.Keys, "\n  "))
	}
	return nil
}

// reconcileStaleAfter is the ingest replica's staleness bound: the one
// set, else the bound convert's own AckWait and back-off call for.
func reconcileStaleAfter(s settings) time.Duration {
	if s.Ingest.ReconcileStaleAfter > 0 {
		return s.Ingest.ReconcileStaleAfter
	}
	return ingest.StaleBound(s.Convert.AckWait, s.Convert.Backoff())
}

// jobQueue is the JOBS stream as reconcile reads and feeds it.
type jobQueue struct{ js jetstream.JetStream }

// JobIDs reads every message the stream holds. JOBS is a work queue: it
// holds exactly the jobs not yet acknowledged, waiting or on a replica,
// and no consumer beside convert's may read it, so messages are fetched by
// sequence, each get skipping the gaps acknowledged jobs left.
func (q jobQueue) JobIDs(ctx context.Context) (map[string]bool, error) {
	stream, err := q.js.Stream(ctx, events.StreamJobs)
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
		if id := jobIDOf(m.Data); id != "" {
			ids[id] = true
		}
		seq = m.Sequence + 1
	}
	return ids, nil
}

// jobIDOf is the job id of a job message, "" if it is not one.
func jobIDOf(data []byte) string {
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

// Requeue publishes the job with its event id as Nats-Msg-Id.
func (q jobQueue) Requeue(ctx context.Context, msg events.Message) (bool, error) {
	data, err := json.Marshal(msg.Event)
	if err != nil {
		return false, fmt.Errorf("encode event %s: %w", msg.Event.ID, err)
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	ack, err := q.js.PublishMsg(pctx, &nats.Msg{Subject: msg.Subject, Data: data}, jetstream.WithMsgID(msg.Event.ID))
	if err != nil {
		return false, fmt.Errorf("publish %s to %s: %w", msg.Event.Type, msg.Subject, err)
	}
	return ack.Duplicate, nil
}
