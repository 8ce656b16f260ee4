package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/imagepipe/imagepipe/events"
)

const lsLong = `Lists recent jobs, newest first, from the status bucket: when each image
last changed, its state, and its output or error.

--state takes one or more of uploaded, queued, downloading, inspecting,
converting, uploading, ready, failed, duplicate, cancelled, comma-separated.
--prefix keeps the images whose BUCKET/KEY, or whose KEY alone, starts with
it. Exit codes: 0 listed (even none), 1 failure, 2 usage error.`

const lsExample = `  imagepipe ls
  imagepipe ls --state failed
  imagepipe ls --prefix uploads/disks/
  imagepipe ls --state queued,converting --json`

// lsOptions are ls's flags.
type lsOptions struct {
	state  string
	prefix string
	limit  int
	asJSON bool
}

// allStates are the states --state accepts, in the order an image passes
// them.
var allStates = []events.State{
	events.StateUploaded, events.StateQueued, events.StateDownloading, events.StateInspecting, events.StateConverting,
	events.StateUploading, events.StateReady, events.StateFailed, events.StateDuplicate, events.StateCancelled,
}

func newLsCmd(e *cliEnv) *cobra.Command {
	var o lsOptions
	c := &cobra.Command{
		Use:     "ls",
		Short:   "list recent jobs (--state, --prefix, --json)",
		Long:    lsLong,
		Example: lsExample,
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runLs(cmd.Context(), o, e.stdout)
		},
	}
	f := c.Flags()
	f.StringVar(&o.state, "state", "", "only images in these states, e.g. failed or queued,converting")
	f.StringVar(&o.prefix, "prefix", "", "only images whose BUCKET/KEY or KEY starts with this")
	f.IntVar(&o.limit, "limit", 50, "at most this many images; 0 for all")
	f.BoolVar(&o.asJSON, "json", false, "print the status records as a JSON array")
	return c
}

// parseStates reads --state: names of states in any case, comma-separated.
func parseStates(list string) ([]events.State, error) {
	var states []events.State
	for s := range strings.SplitSeq(list, ",") {
		if s = strings.TrimSpace(s); s == "" {
			continue
		}
		st := events.State(strings.ToUpper(s))
		if !slices.Contains(allStates, st) {
			names := make([]string, len(allStates))
			for i, a := range allStates {
				names[i] = strings.ToLower(string(a))
			}
			return nil, usageError{fmt.Sprintf("ls: --state %q is not a state; want one or more of %s, comma-separated", s, strings.Join(names, ", "))}
		}
		states = append(states, st)
	}
	return states, nil
}

// runLs lists recent jobs.
func runLs(ctx context.Context, o lsOptions, stdout io.Writer) error {
	if o.limit < 0 {
		return usageError{fmt.Sprintf("ls: --limit %d is negative; want 0 (all) or more", o.limit)}
	}
	states, err := parseStates(o.state)
	if err != nil {
		return err
	}
	kv, closeFn, err := openStatusKV(ctx)
	if err != nil {
		return err
	}
	defer closeFn()
	all, err := readStatuses(ctx, kv)
	if err != nil {
		return err
	}
	var out []events.Status
	for _, st := range all {
		if (len(states) == 0 || slices.Contains(states, st.State)) && underPrefix(st, o.prefix) {
			out = append(out, st)
		}
	}
	slices.SortFunc(out, func(a, b events.Status) int { return b.UpdatedAt.Compare(a.UpdatedAt) })
	if o.limit > 0 && len(out) > o.limit {
		out = out[:o.limit]
	}
	if o.asJSON {
		if out == nil {
			out = []events.Status{}
		}
		return writeJSON(stdout, out)
	}
	if len(out) == 0 {
		fmt.Fprintln(stdout, "no images")
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "UPDATED\tSTATE\tFORMAT\tIMAGE\tOUTPUT OR ERROR")
	for _, st := range out {
		state := string(st.State)
		if !st.State.Terminal() && st.Percent > 0 {
			state = fmt.Sprintf("%s %.0f%%", st.State, st.Percent)
		}
		detail := ""
		switch {
		case st.OutputKey != "":
			detail = st.OutputBucket + "/" + st.OutputKey
		case st.Message != "":
			detail = st.Message
			if st.Phase != "" {
				detail = string(st.Phase) + ": " + detail
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s/%s\t%s\n", st.UpdatedAt.Local().Format(time.DateTime), state,
			orDash(st.InputFormat), st.Bucket, st.Key, oneLine(detail))
	}
	return tw.Flush()
}

// readStatuses reads every current record. One watcher delivers them all
// and then a nil marker, in a single pass over the bucket's stream.
func readStatuses(ctx context.Context, kv jetstream.KeyValue) ([]events.Status, error) {
	w, err := kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("read status: %w", err)
	}
	defer func() { _ = w.Stop() }()
	var out []events.Status
	for {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case e, ok := <-w.Updates():
			if !ok || e == nil {
				return out, nil
			}
			var st events.Status
			if json.Unmarshal(e.Value(), &st) == nil {
				out = append(out, st)
			}
		}
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// oneLine keeps a table row on one line whatever a message holds.
func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if r := []rune(s); len(r) > 100 {
		s = string(r[:99]) + "…"
	}
	return s
}
