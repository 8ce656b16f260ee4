package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/objstore"
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

const statusLong = `Shows the current state of one image from the status bucket: its state and
percent, job id, input format, and its output, or the phase, error and
suggestion of a failure.

With --wait it follows the image until its conversion ends, whatever client
uploaded it (mc, aws s3, rclone, a program): it waits for the status record
to appear and to reach READY, DUPLICATE, FAILED or CANCELLED, printing each
state on stderr, then prints the final record. The exit code then says how
it ended: 0 READY or DUPLICATE, 1 FAILED (with the reason) or CANCELLED, or
1 when --timeout runs out first. Given S3 credentials (IMAGEPIPE_S3_*), it
asks S3 which upload the key holds now, so that the record of an earlier
upload to the same key is not taken for this one's end.

With --job ID it finds the image whose latest job has that id (the job id of
a result event, a notification or ctl status) and shows its record.`

const statusExample = `  imagepipe status uploads/disks/win11.vhdx
  imagepipe status uploads/disks/win11.vhdx --json
  mc cp win11.vhdx local/uploads/disks/ && imagepipe status uploads/disks/win11.vhdx --wait --timeout 30m
  imagepipe status --job 0b6c3f5e-8f0a-5b7e-9d1c-2a4e6f8b0c1d`

// statusOptions are status's flags.
type statusOptions struct {
	asJSON  bool
	wait    bool
	timeout time.Duration
	job     string
}

func newStatusCmd(e *cliEnv) *cobra.Command {
	var o statusOptions
	c := &cobra.Command{
		Use:     "status BUCKET/KEY | --job ID",
		Short:   "show an image's current state; --wait follows it to the end",
		Long:    statusLong,
		Example: statusExample,
		Args: func(cmd *cobra.Command, args []string) error {
			if o.job != "" {
				return argsBetween(0, 0, "no BUCKET/KEY with --job")(cmd, args)
			}
			return argsBetween(1, 1, "one BUCKET/KEY (or --job ID)")(cmd, args)
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return runStatus(cmd.Context(), o, args, e.stdout, e.stderr)
		},
	}
	f := c.Flags()
	f.BoolVar(&o.asJSON, "json", false, "print the record as JSON")
	f.BoolVarP(&o.wait, "wait", "w", false, "wait until the conversion ends; the exit code says how")
	f.DurationVar(&o.timeout, "timeout", 0, "with --wait, give up after this long (default: never)")
	f.StringVar(&o.job, "job", "", "show the image whose latest job has this id")
	return c
}

// runStatus prints one image's state.
func runStatus(ctx context.Context, o statusOptions, args []string, stdout, stderr io.Writer) error {
	if o.timeout < 0 {
		return usageError{fmt.Sprintf("status: --timeout %s is negative; want a duration such as 30m", o.timeout)}
	}
	if o.timeout > 0 && !o.wait {
		return usageError{"status: --timeout needs --wait"}
	}
	if o.job != "" && o.wait {
		return usageError{"status: --job and --wait do not go together; wait on the BUCKET/KEY --job shows"}
	}
	var bucket, key string
	if o.job == "" {
		var err error
		if bucket, key, err = splitObject(args[0]); err != nil {
			return err
		}
	}
	kv, closeFn, err := openStatusKV(ctx)
	if err != nil {
		return err
	}
	defer closeFn()
	var st events.Status
	switch {
	case o.job != "":
		st, err = statusByJob(ctx, kv, o.job)
	case o.wait:
		st, err = waitStatus(ctx, kv, currentUpload(ctx, bucket, key), o.timeout, stderr)
	default:
		st, err = status.New(kv, nil).Get(ctx, bucket, key)
		if errors.Is(err, status.ErrNotFound) {
			err = fmt.Errorf("no image %s/%s is known: it was never uploaded, or its notification has not arrived yet", bucket, key)
		}
	}
	if err != nil {
		return err
	}
	if o.asJSON {
		if err := writeJSON(stdout, st); err != nil {
			return err
		}
	} else {
		printStatus(stdout, st)
	}
	if o.wait {
		return finalError(st)
	}
	return nil
}

// statusByJob finds the record whose latest job is id.
func statusByJob(ctx context.Context, kv jetstream.KeyValue, id string) (events.Status, error) {
	all, err := readStatuses(ctx, kv)
	if err != nil {
		return events.Status{}, err
	}
	for _, st := range all {
		if strings.EqualFold(st.JobID, id) {
			return st, nil
		}
	}
	return events.Status{}, fmt.Errorf("no image has job %s as its latest job: check the id, or the image was uploaded again since (imagepipe ls shows the current jobs)", id)
}

// followed is the object whose conversion status --wait follows, as far
// as S3 tells: with credentials, the job id its content gets and when it
// was written, so that the record of an earlier upload to the same key is
// not taken for its end.
type followed struct {
	bucket, key string
	// known is false when S3 could not be asked; any record counts.
	known bool
	// exists is false when the object is not there yet: only a record
	// written after the wait began counts.
	exists   bool
	began    time.Time
	jobID    string
	modified time.Time
}

// statTimeout bounds the look at S3; without an answer, status --wait
// follows whatever record the key has.
const statTimeout = 5 * time.Second

func currentUpload(ctx context.Context, bucket, key string) followed {
	u := followed{bucket: bucket, key: key, began: time.Now()}
	var s settings
	if err := loadCommandSettings(&s.S3); err != nil || (s.S3.AccessKey == "" && s.S3.AccessKeyFromFile == "") {
		return u
	}
	store, err := objstore.New(s.S3)
	if err != nil {
		return u
	}
	sctx, cancel := context.WithTimeout(ctx, statTimeout)
	defer cancel()
	obj, err := store.Stat(sctx, bucket, key)
	var resp minio.ErrorResponse
	switch {
	case err == nil:
		u.known, u.exists = true, true
		u.jobID = events.JobIDFor(events.ObjectIdentity(bucket, key, obj.VersionID, obj.ETag))
		u.modified = obj.LastModified
	case errors.As(err, &resp) && resp.Code == "NoSuchKey":
		u.known = true
	}
	return u
}

// counts reports whether st is the record of u's conversion: its job, or
// one written since the object was (a reconvert's new job).
func (u followed) counts(st events.Status, initial bool) bool {
	switch {
	case !u.known:
		return true
	case !u.exists:
		// Updates come after the wait began; a record already there
		// counts only if written since, should the upload have been
		// converted before the watch started.
		return !initial || !st.UpdatedAt.Before(u.began)
	}
	// S3 gives the time to the second, rounded down: only a record
	// written a second after it is surely later than the upload.
	return st.JobID == u.jobID || !st.UpdatedAt.Before(u.modified.Add(time.Second))
}

// waitStatus follows one record until it reaches a final state. The
// watcher first delivers the record as it stands, so an image already
// converted is answered at once, and one not yet known is waited for.
func waitStatus(ctx context.Context, kv jetstream.KeyValue, u followed, timeout time.Duration, progress io.Writer) (events.Status, error) {
	bucket, key := u.bucket, u.key
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	w, err := kv.Watch(ctx, events.StatusKey(bucket, key))
	if err != nil {
		return events.Status{}, fmt.Errorf("watch status of %s/%s: %w", bucket, key, err)
	}
	defer func() { _ = w.Stop() }()
	p := newStateProgress(progress)
	defer p.finish()
	var last *events.Status
	initial := true
	for {
		select {
		case <-ctx.Done():
			return events.Status{}, waitTimeout(ctx, bucket, key, timeout, last)
		case e, ok := <-w.Updates():
			if !ok {
				return events.Status{}, fmt.Errorf("watch status of %s/%s ended", bucket, key)
			}
			if e == nil {
				initial = false
				continue
			}
			if e.Operation() != jetstream.KeyValuePut {
				continue
			}
			var st events.Status
			if json.Unmarshal(e.Value(), &st) != nil || !u.counts(st, initial) {
				continue
			}
			last = &st
			if st.State.Terminal() {
				return st, nil
			}
			p.show(st)
		}
	}
}

// waitTimeout says what the wait ended on: the timeout, with the state it
// saw last, or a signal.
func waitTimeout(ctx context.Context, bucket, key string, timeout time.Duration, last *events.Status) error {
	if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("stopped waiting for %s/%s", bucket, key)
	}
	if last == nil {
		return fmt.Errorf("timed out after %s: no status record for %s/%s appeared; check the object is in the input bucket and ingest runs (imagepipe ctl status), or run imagepipe reconcile", timeout, bucket, key)
	}
	state := string(last.State)
	if last.Percent > 0 {
		state = fmt.Sprintf("%s %.0f%%", last.State, last.Percent)
	}
	return fmt.Errorf("timed out after %s: %s/%s is still %s (job %s); keep following it with: imagepipe status %s/%s --wait", timeout, bucket, key, state, last.JobID, bucket, key)
}

// finalError is how a followed conversion ended, as an error for any
// end but a converted image.
func finalError(st events.Status) error {
	switch st.State {
	case events.StateReady, events.StateDuplicate:
		return nil
	case events.StateCancelled:
		return fmt.Errorf("%s/%s was cancelled by an operator", st.Bucket, st.Key)
	}
	msg := fmt.Sprintf("%s/%s failed", st.Bucket, st.Key)
	if st.Phase != "" {
		msg += " in " + string(st.Phase)
	}
	if st.Message != "" {
		msg += ": " + st.Message
	}
	if st.Suggestion != "" {
		msg += "; suggestion: " + st.Suggestion
	}
	return errors.New(msg)
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

const watchLong = `Prints every state change of every image as it happens, starting with each
image's current state. PREFIX keeps only the images whose BUCKET/KEY, or
whose KEY alone, starts with it. Ctrl-C stops it.`

func newWatchCmd(e *cliEnv) *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:     "watch [PREFIX]",
		Short:   "follow images' states live, optionally only under PREFIX",
		Long:    watchLong,
		Example: "  imagepipe watch\n  imagepipe watch uploads/disks/\n  imagepipe watch disks/ --json",
		Args:    argsBetween(0, 1, "at most one PREFIX"),
		RunE: func(cmd *cobra.Command, args []string) error {
			prefix := ""
			if len(args) == 1 {
				prefix = args[0]
			}
			return runWatch(cmd.Context(), prefix, asJSON, e.stdout)
		},
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print one JSON record per line")
	return c
}

// underPrefix reports whether st's image is under prefix, given as
// BUCKET/KEY or as a key prefix alone.
func underPrefix(st events.Status, prefix string) bool {
	return prefix == "" || strings.HasPrefix(st.Bucket+"/"+st.Key, prefix) || strings.HasPrefix(st.Key, prefix)
}

// runWatch prints every state change as it happens.
func runWatch(ctx context.Context, prefix string, asJSON bool, stdout io.Writer) error {
	kv, closeFn, err := openStatusKV(ctx)
	if err != nil {
		return err
	}
	defer closeFn()
	w, err := kv.WatchAll(ctx)
	if err != nil {
		return fmt.Errorf("watch status: %w", err)
	}
	defer func() { _ = w.Stop() }()
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
			if json.Unmarshal(e.Value(), &st) != nil || !underPrefix(st, prefix) {
				continue
			}
			if asJSON {
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
