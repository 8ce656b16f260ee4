package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
)

const lsUsage = `Usage: imagepipe ls [--state STATE] [--limit N] [--json]

Lists recent jobs, newest first, from the status bucket: when each image
last changed, its state, and its output or error.

Flags:
  --state STATE   only images in this state, e.g. failed, converting, ready
                  (several: failed,cancelled)
  --limit N       at most N images (default 50; 0 for all)
  --json          print the status records as a JSON array

Examples:
  imagepipe ls
  imagepipe ls --state failed
  imagepipe ls --state queued,converting --json

Exit codes: 0 listed (even none), 1 failure, 2 usage error.
`

// runLs lists recent jobs.
func runLs(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("ls", flag.ContinueOnError)
	state := fs.String("state", "", "")
	limit := fs.Int("limit", 50, "")
	asJSON := fs.Bool("json", false, "")
	pos, err := parseArgs(fs, lsUsage, args, stdout)
	if err != nil {
		return err
	}
	if len(pos) != 0 {
		return usageError{"ls takes no arguments"}
	}
	if *limit < 0 {
		return usageError{"ls: --limit must not be negative"}
	}
	var states []events.State
	for s := range strings.SplitSeq(*state, ",") {
		if s = strings.TrimSpace(s); s != "" {
			states = append(states, events.State(strings.ToUpper(s)))
		}
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
		if len(states) == 0 || slices.Contains(states, st.State) {
			out = append(out, st)
		}
	}
	slices.SortFunc(out, func(a, b events.Status) int { return b.UpdatedAt.Compare(a.UpdatedAt) })
	if *limit > 0 && len(out) > *limit {
		out = out[:*limit]
	}
	if *asJSON {
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
