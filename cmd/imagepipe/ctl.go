package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/control"
	"github.com/imagepipe/imagepipe/internal/fleet"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/orphan"
)

const ctlLong = `Asks every running replica of every function over NATS, gathers the
answers for --timeout, and prints one table. Replicas are found by asking,
so nothing needs to know where they run.

The same requests are NATS requests on imagepipe.ctl.<function>.<verb>,
and each replica is a NATS micro service: nats micro ls, nats micro stats
imagepipe-convert.

--instance waits for the replica named, asking again until it answers, for
up to four times IMAGEPIPE_CONNECT_TIMEOUT (default 20s) or --timeout,
whichever is longer.

Exit codes: 0 done, 1 no replica answered (with --instance: not that one,
within the wait above) or one answered with an error
(or, for cancel, nothing to cancel), 2 usage error.
`

// connectCLI connects a command-line tool to NATS.
func connectCLI(ctx context.Context) (*nats.Conn, settings, error) {
	// ctl stats counts lost jobs by reconcile's bound.
	var s settings
	bound, finish := s.staleBoundParts()
	if err := loadCommandSettings(append([]any{&s.NATS}, bound...)...); err != nil {
		return nil, s, err
	}
	finish()
	nc, err := natsrt.Connect(ctx, s.NATS, "cli", slog.New(slog.DiscardHandler))
	if err != nil {
		return nil, s, err
	}
	return nc, s, nil
}

const ctlExample = `  imagepipe ctl status
  imagepipe ctl pause --function convert
  imagepipe ctl drain --instance NDWsUwoEz3u4Ad5oRaZ0Wv
  imagepipe ctl stats --json
  imagepipe ctl cancel uploads/disks/win11.vhdx`

// ctlVerbs says what each verb does, for its help.
var ctlVerbs = map[string]string{
	events.VerbStatus: "state, jobs in flight, uptime, version and settings of each replica",
	events.VerbStats:  "fleet statistics from the results stream (they survive any restart), the queue, jobs in flight, and each replica's counts",
	events.VerbPause:  "stop fetching new jobs; jobs in flight finish",
	events.VerbResume: "fetch again after a pause",
	events.VerbDrain:  "finish the jobs in flight, then exit 0",
	events.VerbStop:   "stop now; jobs in flight go back to the queue at once, for another replica",
	events.VerbCancel: "stop the conversion of BUCKET/KEY, running or still queued",
}

// ctlOptions are the flags every ctl verb takes.
type ctlOptions struct {
	function string
	instance string
	asJSON   bool
	timeout  time.Duration
}

func newCtlCmd(e *cliEnv) *cobra.Command {
	var o ctlOptions
	c := &cobra.Command{
		Use:     "ctl VERB",
		Short:   "status, stats, pause, resume, drain, stop or cancel the running replicas",
		Long:    ctlLong,
		Example: ctlExample,
		Args:    cobra.ArbitraryArgs,
		// Only a missing or unknown verb lands here.
		RunE: func(_ *cobra.Command, args []string) error {
			if len(args) == 0 {
				return usageError{"ctl needs a verb: " + strings.Join(events.Verbs(), ", ") + " (see imagepipe ctl --help)"}
			}
			return usageError{fmt.Sprintf("ctl: unknown verb %q; want one of %s", args[0], strings.Join(events.Verbs(), ", "))}
		},
	}
	f := c.PersistentFlags()
	f.StringVar(&o.function, "function", "", "only ingest, convert or notify replicas (default: all; cancel always asks convert)")
	f.StringVar(&o.instance, "instance", "", "only the replica with this instance id (see ctl status)")
	f.BoolVar(&o.asJSON, "json", false, "print JSON instead of a table")
	f.DurationVar(&o.timeout, "timeout", control.DefaultTimeout, "how long to gather answers")
	for _, verb := range events.Verbs() {
		use, args := verb, noArgs
		if verb == events.VerbCancel {
			use, args = verb+" BUCKET/KEY", argsBetween(1, 1, "one BUCKET/KEY")
		}
		c.AddCommand(&cobra.Command{
			Use:   use,
			Short: ctlVerbs[verb],
			Args:  args,
			RunE: func(cmd *cobra.Command, args []string) error {
				return runCtl(cmd.Context(), verb, o, args, e.stdout)
			},
		})
	}
	return c
}

// runCtl steers and inspects the running replicas.
func runCtl(ctx context.Context, verb string, o ctlOptions, pos []string, stdout io.Writer) error {
	functions := events.Functions()
	if o.function != "" {
		if !slices.Contains(events.Functions(), o.function) {
			return usageError{fmt.Sprintf("ctl: --function %q is not a function; want one of %s", o.function, strings.Join(events.Functions(), ", "))}
		}
		functions = []string{o.function}
	}
	if o.timeout <= 0 {
		return usageError{fmt.Sprintf("ctl: --timeout %s is not positive; want a duration such as 2s", o.timeout)}
	}
	var bucket, key string
	if verb == events.VerbCancel {
		var err error
		if bucket, key, err = splitObject(pos[0]); err != nil {
			return err
		}
		if o.function != "" && o.function != events.FunctionConvert {
			return usageError{"ctl cancel: only convert runs jobs that can be cancelled"}
		}
	}
	nc, s, err := connectCLI(ctx)
	if err != nil {
		return err
	}
	defer nc.Close()
	// A replica named by --instance exists, so its silence is more likely a
	// slow machine than its absence: look for it several times as long as
	// connecting may take, and never less than the gathering window.
	client := control.NewClient(nc, o.timeout).FindWithin(max(4*s.NATS.Timeout(), o.timeout))

	switch verb {
	case events.VerbStatus:
		sts, err := client.Status(ctx, functions, o.instance)
		if len(sts) > 0 {
			if perr := printStatuses(stdout, sts, o.asJSON, true); perr != nil {
				return perr
			}
		}
		return err
	case events.VerbStats:
		return ctlStats(ctx, nc, client, functions, o.instance, o.asJSON, reconcileStaleAfter(s), stdout)
	case events.VerbCancel:
		return ctlCancel(ctx, nc, client, bucket, key, o.asJSON, stdout)
	}
	sts, err := client.Steer(ctx, functions, verb, o.instance)
	if len(sts) > 0 {
		if perr := printStatuses(stdout, sts, o.asJSON, false); perr != nil {
			return perr
		}
	}
	return err
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printStatuses(w io.Writer, sts []events.ReplicaStatus, asJSON, details bool) error {
	if asJSON {
		return writeJSON(w, sts)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "FUNCTION\tINSTANCE\tHOST\tSTATE\tIN FLIGHT\tUPTIME\tVERSION")
	for _, s := range sts {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\n", s.Function, s.Instance, s.Host, s.State, s.InFlight,
			time.Duration(s.UptimeSeconds)*time.Second, s.Version)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if !details {
		return nil
	}
	var jobs [][]string
	for _, s := range sts {
		for _, j := range s.Jobs {
			what := j.Bucket + "/" + j.Key
			if j.Key == "" {
				what = "(message)"
			}
			jobs = append(jobs, []string{s.Function, s.Instance, what, j.ID, fmt.Sprint(j.Attempt), time.Since(j.Started).Round(time.Second).String()})
		}
	}
	if len(jobs) > 0 {
		fmt.Fprintln(w, "\nJobs in flight")
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "FUNCTION\tINSTANCE\tINPUT\tJOB\tATTEMPT\tRUNNING")
		for _, j := range jobs {
			fmt.Fprintln(tw, strings.Join(j, "\t"))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	fmt.Fprintln(w, "\nSettings")
	for _, s := range sts {
		var kv []string
		for _, k := range slices.Sorted(maps.Keys(s.Config)) {
			kv = append(kv, k+"="+s.Config[k])
		}
		fmt.Fprintf(w, "  %s %s: %s\n", s.Function, s.Instance, strings.Join(kv, " "))
	}
	return nil
}

// fleetReport is what `ctl stats` prints.
type fleetReport struct {
	Results  fleet.ResultStats     `json:"results"`
	Queue    queueDepth            `json:"queue"`
	InFlight int64                 `json:"in_flight"`
	Replicas []events.ReplicaStats `json:"replicas"`
	// Orphaned counts the uploads that wait with no job behind them (see
	// package orphan); nil when they could not be counted.
	Orphaned *orphan.Count `json:"orphaned,omitempty"`
}

// queueDepth is the convert consumer's backlog: messages waiting plus
// messages handed out and not yet acknowledged.
type queueDepth struct {
	Pending    uint64 `json:"pending"`
	AckPending int    `json:"ack_pending"`
	Depth      uint64 `json:"depth"`
}

func ctlStats(ctx context.Context, nc *nats.Conn, client *control.Client, functions []string, instance string, asJSON bool, staleAfter time.Duration, w io.Writer) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	var rep fleetReport
	// The durable numbers come first: they need no replica at all.
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if rep.Results, err = fleet.ReadResults(rctx, js); err != nil {
		return err
	}
	if cons, err := js.Consumer(rctx, events.StreamJobs, events.ConsumerConvert); err == nil {
		if info, err := cons.Info(rctx); err == nil {
			rep.Queue = queueDepth{Pending: info.NumPending, AckPending: info.NumAckPending, Depth: info.NumPending + uint64(info.NumAckPending)}
		}
	}
	// Uploads whose job was lost: a stall the queue's depth cannot show.
	// Counted if the user may read the status bucket and JOBS, and soon.
	octx, ocancel := context.WithTimeout(rctx, 15*time.Second)
	if c, err := orphan.Find(octx, js, time.Now(), staleAfter); err == nil {
		rep.Orphaned = &c
	}
	ocancel()
	replicas, gerr := client.Stats(ctx, functions, instance)
	if errors.Is(gerr, control.ErrNoReplica) {
		gerr = nil
	}
	rep.Replicas = replicas
	for _, r := range replicas {
		if r.Function == events.FunctionConvert {
			rep.InFlight += r.InFlight
		}
	}
	if asJSON {
		if err := writeJSON(w, rep); err != nil {
			return err
		}
		return gerr
	}
	printFleet(w, rep)
	return gerr
}

func printFleet(w io.Writer, rep fleetReport) {
	r := rep.Results
	window := "no results yet"
	if r.Events > 0 {
		window = fmt.Sprintf("%s to %s", r.From.Local().Format(time.DateTime), r.To.Local().Format(time.DateTime))
	}
	fmt.Fprintf(w, "Fleet, from the results stream (%s)\n", window)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "  processed\t%d\t(converted %d, duplicates %d, failed %d, cancelled %d)\n", r.Processed, r.Converted, r.Duplicates, r.Failed, r.Cancelled)
	fmt.Fprintf(tw, "  retried\t%d\tfailed attempts that were tried again\n", r.Retried)
	fmt.Fprintf(tw, "  success rate\t%s\t\n", percent(r.SuccessRate, r.Converted+r.Duplicates+r.Failed))
	fmt.Fprintf(tw, "  conversion time\tavg %s\tp50 %s  p95 %s\n", seconds(r.AvgSeconds), seconds(r.P50Seconds), seconds(r.P95Seconds))
	fmt.Fprintf(tw, "  bytes\tin %s\tout %s, of which zeros copied server-side %s (%.0f%%)\n", humanize.IBytes(uint64(r.BytesIn)), humanize.IBytes(uint64(r.BytesOut)),
		humanize.IBytes(uint64(r.BytesZero)), 100*r.ZeroFraction)
	fmt.Fprintf(tw, "  queue\t%d\t(%d waiting, %d held by replicas)\n", rep.Queue.Depth, rep.Queue.Pending, rep.Queue.AckPending)
	fmt.Fprintf(tw, "  in flight\t%d\tacross convert replicas\n", rep.InFlight)
	if o := rep.Orphaned; o != nil {
		fmt.Fprintf(tw, "  no job\t%d\tuploads standing still with no job in the queue; imagepipe reconcile queues them again\n", o.Uploads)
		for _, k := range o.Keys {
			fmt.Fprintf(tw, "  \t\t%s\n", k)
		}
	}
	_ = tw.Flush()

	if len(r.ByFormat) > 0 {
		fmt.Fprintln(w, "\nBy input format")
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "FORMAT\tCONVERTED\tDUPLICATES\tFAILED\tCANCELLED\tRETRIED\tSUCCESS")
		for _, name := range slices.Sorted(maps.Keys(r.ByFormat)) {
			f := r.ByFormat[name]
			fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t%d\t%s\n", name, f.Converted, f.Duplicates, f.Failed, f.Cancelled, f.Retried,
				percent(f.SuccessRate, f.Converted+f.Duplicates+f.Failed))
		}
		_ = tw.Flush()
	}

	fmt.Fprintln(w, "\nReplicas")
	if len(rep.Replicas) == 0 {
		fmt.Fprintln(w, "  none answered")
		return
	}
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "FUNCTION\tINSTANCE\tHOST\tSTATE\tIN FLIGHT\tUPTIME\tHANDLED\tACKED\tRETRIED\tTERMINATED\tCANCELLED\tABORTED")
	for _, s := range rep.Replicas {
		c := s.Counts
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%d\t%d\t%d\t%d\t%d\t%d\n", s.Function, s.Instance, s.Host, s.State, s.InFlight,
			time.Duration(s.UptimeSeconds)*time.Second, c.Handled, c.Acked, c.Retried, c.Terminated, c.Cancelled, c.Aborted)
	}
	_ = tw.Flush()
}

func percent(rate float64, of int64) string {
	if of == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f%%", 100*rate)
}

func ctlCancel(ctx context.Context, nc *nats.Conn, client *control.Client, bucket, key string, asJSON bool, w io.Writer) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	kv, err := js.KeyValue(ctx, events.StatusBucket)
	if err != nil {
		return fmt.Errorf("open status bucket (is imagepipe running?): %w", err)
	}
	res, err := client.Cancel(ctx, kv, bucket, key)
	if err != nil {
		return err
	}
	if asJSON {
		return writeJSON(w, res)
	}
	for _, r := range res.Running {
		for _, j := range r.Cancelled {
			fmt.Fprintf(w, "cancelled job %s of %s/%s on %s (%s); its result event says so\n", j.ID, bucket, key, r.Instance, r.Host)
		}
	}
	if res.Queued {
		fmt.Fprintf(w, "cancelled job %s of %s/%s before it started; convert will skip it\n", res.JobID, bucket, key)
	}
	return nil
}
