package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/status"
)

func splitObject(arg string) (bucket, key string, err error) {
	bucket, key, ok := strings.Cut(arg, "/")
	if !ok || bucket == "" || key == "" {
		return "", "", usageError{fmt.Sprintf("%q is not BUCKET/KEY", arg)}
	}
	return bucket, key, nil
}

func openStatusKV(ctx context.Context) (jetstream.KeyValue, func(), error) {
	nc, _, err := connectCLI(ctx)
	if err != nil {
		return nil, nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	kv, err := js.KeyValue(ctx, events.StatusBucket)
	if err != nil {
		nc.Close()
		return nil, nil, fmt.Errorf("open status bucket (is imagepipe running?): %w", err)
	}
	return kv, nc.Close, nil
}

// runStatus prints one image's state.
func runStatus(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print the record as JSON")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "Usage: imagepipe status [--json] BUCKET/KEY\n\nExample: imagepipe status uploads/disks/win11.vhdx")
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usageError{"status takes one BUCKET/KEY"}
	}
	bucket, key, err := splitObject(fs.Arg(0))
	if err != nil {
		return err
	}
	kv, closeFn, err := openStatusKV(ctx)
	if err != nil {
		return err
	}
	defer closeFn()
	st, err := status.New(kv, nil).Get(ctx, bucket, key)
	if errors.Is(err, status.ErrNotFound) {
		return fmt.Errorf("no image %s/%s is known: it was never uploaded, or its notification has not arrived yet", bucket, key)
	}
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	printStatus(stdout, st)
	return nil
}

func printStatus(w io.Writer, st events.Status) {
	fmt.Fprintf(w, "%s/%s\n", st.Bucket, st.Key)
	state := string(st.State)
	if st.State == events.StateConverting || st.State == events.StateUploading {
		state = fmt.Sprintf("%s %.0f%%", st.State, st.Percent)
	}
	fmt.Fprintf(w, "  state    %s\n", state)
	fmt.Fprintf(w, "  job      %s (attempt %d)\n", st.JobID, st.Attempt)
	if st.InputFormat != "" {
		fmt.Fprintf(w, "  format   %s\n", st.InputFormat)
	}
	if st.OutputKey != "" {
		fmt.Fprintf(w, "  output   %s/%s\n", st.OutputBucket, st.OutputKey)
	}
	if st.Message != "" {
		fmt.Fprintf(w, "  error    %s: %s\n", st.Phase, st.Message)
	}
	if st.Suggestion != "" {
		fmt.Fprintf(w, "  try      %s\n", st.Suggestion)
	}
	fmt.Fprintf(w, "  updated  %s\n", st.UpdatedAt.Format(time.RFC3339))
}

// runWatch prints every state change as it happens.
func runWatch(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("watch", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print one JSON record per line")
	if err := fs.Parse(args); err != nil {
		return err
	}
	kv, closeFn, err := openStatusKV(ctx)
	if err != nil {
		return err
	}
	defer closeFn()
	w, err := kv.WatchAll(ctx)
	if err != nil {
		return fmt.Errorf("watch status: %w", err)
	}
	defer w.Stop()
	enc := json.NewEncoder(stdout)
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-w.Updates():
			if !ok {
				return nil
			}
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue
			}
			var st events.Status
			if json.Unmarshal(e.Value(), &st) != nil {
				continue
			}
			if *asJSON {
				_ = enc.Encode(st)
				continue
			}
			line := fmt.Sprintf("%s  %-11s %5.1f%%  %s/%s", st.UpdatedAt.Local().Format("15:04:05"), st.State, st.Percent, st.Bucket, st.Key)
			if st.Message != "" {
				line += "  " + st.Message
			}
			fmt.Fprintln(stdout, line)
		}
	}
}
