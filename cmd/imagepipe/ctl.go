package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
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

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/control"
	"github.com/imagepipe/imagepipe/internal/natsrt"
)

const ctlUsage = `Usage: imagepipe ctl VERB [--function NAME] [--instance ID] [--json] [--timeout D] [BUCKET/KEY]

Asks every running replica of every function over NATS, gathers the
answers for --timeout, and prints one table. Replicas are found by asking,
so nothing needs to know where they run.

Verbs:
  status   state, jobs in flight, uptime, version and settings of each replica
  stats    fleet statistics from the results stream (they survive any
           restart), the queue, jobs in flight, and each replica's counts
  pause    stop fetching new jobs; jobs in flight finish
  resume   fetch again after a pause
  drain    finish the jobs in flight, then exit 0
  stop     stop now; jobs in flight go back to the queue at once, for
           another replica
  cancel   stop the conversion of BUCKET/KEY, running or still queued

Flags:
  --function NAME   only ingest, convert or notify replicas (default: all;
                    cancel always asks convert)
  --instance ID     only the replica with this instance id (see ctl status);
                    it is asked again until it answers, for up to
                    IMAGEPIPE_CONNECT_TIMEOUT (default 20s) or --timeout,
                    whichever is longer
  --json            print JSON instead of a table
  --timeout D       how long to gather answers (default 1s)

Examples:
  imagepipe ctl status
  imagepipe ctl pause --function convert
  imagepipe ctl drain --instance NDWsUwoEz3u4Ad5oRaZ0Wv
  imagepipe ctl stats --json
  imagepipe ctl cancel uploads/disks/win11.vhdx

The same requests are NATS requests on imagepipe.ctl.<function>.<verb>,
and each replica is a NATS micro service: nats micro ls, nats micro stats
imagepipe-convert.

Exit codes: 0 done, 1 no replica answered (with --instance: not that one,
within the wait above) or one answered with an error
(or, for cancel, nothing to cancel), 2 usage error.
`

// parseArgs parses flags wherever they stand among the arguments, so that
// "ctl cancel uploads/a.vhdx --json" works, and turns a bad flag into a
// usage error. --help prints usage to stdout.
func parseArgs(fs *flag.FlagSet, usage string, args []string, stdout io.Writer) ([]string, error) {
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				fmt.Fprint(stdout, usage)
				return nil, err
			}
			return nil, usageError{fmt.Sprintf("%s %v (see imagepipe %s --help)", fs.Name(), err, fs.Name())}
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

// connectCLI connects a command-line tool to NATS.
func connectCLI(ctx context.Context) (*nats.Conn, settings, error) {
	s, err := loadSettings()
	if err != nil {
		return nil, s, err
	}
	nc, err := natsrt.Connect(ctx, s.NATS, "cli", slog.New(slog.DiscardHandler))
	if err != nil {
		return nil, s, err
	}
	return nc, s, nil
}

// runCtl steers and inspects the running replicas.
func runCtl(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) == 0 {
		return usageError{"ctl needs a verb: " + strings.Join(control.Verbs, ", ") + " (see imagepipe ctl --help)"}
	}
	verb := args[0]
	if verb == "-h" || verb == "--help" || verb == "help" {
		fmt.Fprint(stdout, ctlUsage)
		return flag.ErrHelp
	}
	if !slices.Contains(control.Verbs, verb) {
		return usageError{fmt.Sprintf("ctl: unknown verb %q; want one of %s", verb, strings.Join(control.Verbs, ", "))}
	}
	fs := flag.NewFlagSet("ctl", flag.ContinueOnError)
	function := fs.String("function", "", "")
	instance := fs.String("instance", "", "")
	asJSON := fs.Bool("json", false, "")
	timeout := fs.Duration("timeout", control.DefaultTimeout, "")
	pos, err := parseArgs(fs, ctlUsage, args[1:], stdout)
	if err != nil {
		return err
	}
	functions := control.Functions
	if *function != "" {
		if !slices.Contains(control.Functions, *function) {
			return usageError{fmt.Sprintf("ctl: unknown function %q; want one of %s", *function, strings.Join(control.Functions, ", "))}
		}
		functions = []string{*function}
	}
	var bucket, key string
	switch {
	case verb == control.VerbCancel && len(pos) != 1:
		return usageError{"ctl cancel takes one BUCKET/KEY"}
	case verb == control.VerbCancel:
		if bucket, key, err = splitObject(pos[0]); err != nil {
			return err
		}
		if *function != "" && *function != "convert" {
			return usageError{"ctl cancel: only convert runs jobs that can be cancelled"}
		}
	case len(pos) != 0:
		return usageError{fmt.Sprintf("ctl %s takes no arguments", verb)}
	}

	nc, s, err := connectCLI(ctx)
	if err != nil {
		return err
	}
	defer nc.Close()
	// A replica named by --instance exists, so its silence is more likely a
	// slow machine than its absence: look for it as long as connecting may
	// take, and never less than the gathering window.
	client := control.NewClient(nc, *timeout).FindWithin(max(s.NATS.Timeout(), *timeout))

	switch verb {
	case control.VerbStatus:
		sts, err := client.Status(ctx, functions, *instance)
		if len(sts) > 0 {
			if perr := printStatuses(stdout, sts, *asJSON, true); perr != nil {
				return perr
			}
		}
		return err
	case control.VerbStats:
		return ctlStats(ctx, nc, client, functions, *instance, *asJSON, stdout)
	case control.VerbCancel:
		return ctlCancel(ctx, nc, client, bucket, key, *asJSON, stdout)
	}
	sts, err := client.Steer(ctx, functions, verb, *instance)
	if len(sts) > 0 {
		if perr := printStatuses(stdout, sts, *asJSON, false); perr != nil {
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

func printStatuses(w io.Writer, sts []control.Status, asJSON, details bool) error {
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
	Results  control.ResultStats    `json:"results"`
	Queue    queueDepth             `json:"queue"`
	InFlight int64                  `json:"in_flight"`
	Replicas []control.ReplicaStats `json:"replicas"`
}

// queueDepth is the convert consumer's backlog: messages waiting plus
// messages handed out and not yet acknowledged.
type queueDepth struct {
	Pending    uint64 `json:"pending"`
	AckPending int    `json:"ack_pending"`
	Depth      uint64 `json:"depth"`
}

func ctlStats(ctx context.Context, nc *nats.Conn, client *control.Client, functions []string, instance string, asJSON bool, w io.Writer) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return err
	}
	var rep fleetReport
	// The durable numbers come first: they need no replica at all.
	rctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if rep.Results, err = control.ReadResults(rctx, js); err != nil {
		return err
	}
	if cons, err := js.Consumer(rctx, events.StreamJobs, "convert"); err == nil {
		if info, err := cons.Info(rctx); err == nil {
			rep.Queue = queueDepth{Pending: info.NumPending, AckPending: info.NumAckPending, Depth: info.NumPending + uint64(info.NumAckPending)}
		}
	}
	replicas, gerr := client.Stats(ctx, functions, instance)
	if errors.Is(gerr, control.ErrNoReplica) {
		gerr = nil
	}
	rep.Replicas = replicas
	for _, r := range replicas {
		if r.Function == "convert" {
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
	fmt.Fprintf(tw, "  bytes\tin %s\tout %s\n", humanize.IBytes(uint64(r.BytesIn)), humanize.IBytes(uint64(r.BytesOut)))
	fmt.Fprintf(tw, "  queue\t%d\t(%d waiting, %d held by replicas)\n", rep.Queue.Depth, rep.Queue.Pending, rep.Queue.AckPending)
	fmt.Fprintf(tw, "  in flight\t%d\tacross convert replicas\n", rep.InFlight)
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
