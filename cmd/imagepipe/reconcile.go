package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/ingest"
	"github.com/imagepipe/imagepipe/internal/control"
	"github.com/imagepipe/imagepipe/internal/orphan"
)

const reconcileLong = `Asks an ingest replica to list the input bucket and heal every upload that
would otherwise never end: it queues every eligible object that has no
status record, as if its lost notification had arrived; writes READY back
for one whose output is complete; and queues again the job of every upload
whose status stood still in a non-final state while the job queue no longer
holds it. It prints what it did.`

// reconcileOptions are reconcile's flags.
type reconcileOptions struct {
	prefix     string
	staleAfter string
	timeout    time.Duration
}

func newReconcileCmd(e *cliEnv) *cobra.Command {
	var o reconcileOptions
	c := &cobra.Command{
		Use:     "reconcile",
		Short:   "queue uploads whose notification was lost (--prefix P)",
		Long:    reconcileLong,
		Example: "  imagepipe reconcile\n  imagepipe reconcile --prefix disks/ --stale-after 20m",
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runReconcile(cmd.Context(), o, e.stdout)
		},
	}
	f := c.Flags()
	f.StringVar(&o.prefix, "prefix", "", "reconcile only keys under this prefix")
	f.StringVar(&o.staleAfter, "stale-after", os.Getenv("IMAGEPIPE_RECONCILE_STALE_AFTER"),
		"how long a non-final status may stand still, its job gone from the queue, before the job is queued again (default: the replica's IMAGEPIPE_RECONCILE_STALE_AFTER)")
	f.DurationVar(&o.timeout, "timeout", 10*time.Minute, "how long to wait for the pass to finish (it goes on if this runs out)")
	return c
}

// runReconcile asks an ingest replica to list the input bucket and heal
// every upload that would otherwise never end, and prints what it did.
func runReconcile(ctx context.Context, o reconcileOptions, stdout io.Writer) error {
	if o.staleAfter != "" {
		if d, err := time.ParseDuration(o.staleAfter); err != nil || d < 0 {
			return usageError{fmt.Sprintf("reconcile: --stale-after (IMAGEPIPE_RECONCILE_STALE_AFTER) %q is not a duration of zero or more, such as 20m", o.staleAfter)}
		}
	}
	if err := checkTimeout("reconcile", o.timeout); err != nil {
		return err
	}
	req := events.ReconcileRequest{Prefix: o.prefix, StaleAfter: o.staleAfter}
	res, err := askIngest(ctx, o.timeout, (*control.Client).Reconcile, req)
	if err != nil {
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

// JobIDs reads every message the stream holds (see orphan.JobIDs).
func (q jobQueue) JobIDs(ctx context.Context) (map[string]bool, error) {
	return orphan.JobIDs(ctx, q.js)
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
