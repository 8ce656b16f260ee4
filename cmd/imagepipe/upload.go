package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/convert"
	"github.com/imagepipe/imagepipe/internal/objstore"
)

const uploadUsage = `Usage: imagepipe upload [--no-wait] [--format raw|qcow2] [--timeout D] [--json] FILE [BUCKET/KEY]

Uploads FILE to the input bucket with a progress bar, then follows its
conversion (state and percent) until it is READY or FAILED, and prints
where the output is or what went wrong and what to do about it.

BUCKET/KEY defaults to the input bucket (IMAGEPIPE_INPUT_BUCKET, "uploads")
and the file's name; a KEY ending in "/" is a folder the file goes into.
Storage is reached with the IMAGEPIPE_S3_* settings, the job followed over
NATS (IMAGEPIPE_NATS_URL).

Flags:
  --no-wait        stop once the upload is done
  --format F       output format for this upload: raw or qcow2 (default:
                   the converter's IMAGEPIPE_OUTPUT_FORMAT)
  --timeout D      give up following after D (default: never)
  --json           print the final status record as JSON

Examples:
  imagepipe upload win11.vhdx
  imagepipe upload win11.vhdx uploads/disks/
  imagepipe upload --format qcow2 web.vmdk uploads/vm/web.vmdk
  imagepipe upload --no-wait big.vhdx

Exit codes: 0 converted (READY, or a duplicate of an earlier upload), 1
upload failed, conversion failed or was cancelled, 2 usage error.
`

// runUpload uploads a file and follows its job.
func runUpload(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("upload", flag.ContinueOnError)
	noWait := fs.Bool("no-wait", false, "")
	format := fs.String("format", "", "")
	timeout := fs.Duration("timeout", 0, "")
	asJSON := fs.Bool("json", false, "")
	pos, err := parseArgs(fs, uploadUsage, args, stdout)
	if err != nil {
		return err
	}
	if len(pos) < 1 || len(pos) > 2 {
		return usageError{"upload takes FILE and an optional BUCKET/KEY"}
	}
	if *format != "" && *format != "raw" && *format != "qcow2" {
		return usageError{fmt.Sprintf("upload: --format %q is not raw or qcow2", *format)}
	}
	path := pos[0]
	s, err := loadSettings()
	if err != nil {
		return err
	}
	bucket, key := s.Ingest.InputBucket, filepath.Base(path)
	if len(pos) == 2 {
		b, k, ok := strings.Cut(pos[1], "/")
		if !ok || b == "" {
			return usageError{fmt.Sprintf("%q is not BUCKET/KEY", pos[1])}
		}
		bucket = b
		if k == "" || strings.HasSuffix(k, "/") {
			k += filepath.Base(path)
		}
		key = k
	}
	st, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("upload: %w", err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("upload: %s is not a regular file", path)
	}
	if *timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}

	store, err := objstore.New(s.S3)
	if err != nil {
		return err
	}
	// Watching starts before the upload, so the record of an earlier
	// upload of the same key is known and a quick conversion is not missed.
	var follow *jobFollower
	if !*noWait {
		if follow, err = newJobFollower(ctx, bucket, key); err != nil {
			return err
		}
		defer follow.close()
	}

	var meta map[string]string
	if *format != "" {
		meta = map[string]string{convert.MetaFormat: *format}
	}
	bar := newByteProgress(stderr, st.Size(), "uploading "+filepath.Base(path))
	obj, err := store.UploadFile(ctx, bucket, key, path, meta, bar)
	bar.finish()
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "uploaded %s to %s/%s (%s)\n", path, bucket, key, humanize.IBytes(uint64(st.Size())))
	if *noWait {
		if *asJSON {
			return writeJSON(stdout, map[string]any{"bucket": bucket, "key": key, "size": st.Size(), "etag": obj.ETag})
		}
		fmt.Fprintf(stdout, "%s/%s\n", bucket, key)
		return nil
	}

	jobID := events.JobIDFor(events.ObjectIdentity(bucket, key, obj.VersionID, obj.ETag))
	final, err := follow.until(ctx, jobID, stderr)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("%s/%s is not converted within %s; follow it with: imagepipe status %s/%s", bucket, key, *timeout, bucket, key)
		}
		return err
	}
	if *asJSON {
		if err := writeJSON(stdout, final); err != nil {
			return err
		}
	}
	switch final.State {
	case events.StateReady, events.StateDuplicate:
		if !*asJSON {
			fmt.Fprintf(stdout, "%s/%s\n", final.OutputBucket, final.OutputKey)
		}
		return nil
	case events.StateCancelled:
		return fmt.Errorf("%s/%s was cancelled by an operator", bucket, key)
	}
	msg := fmt.Sprintf("%s/%s failed", bucket, key)
	if final.Phase != "" {
		msg += " in " + string(final.Phase)
	}
	if final.Message != "" {
		msg += ": " + final.Message
	}
	if final.Suggestion != "" {
		msg += "; suggestion: " + final.Suggestion
	}
	return errors.New(msg)
}

// jobFollower watches one input's status record.
type jobFollower struct {
	closeNC func()
	w       jetstream.KeyWatcher
	// before is the record as it was before the upload, if any.
	before  *events.Status
	started time.Time
}

func newJobFollower(ctx context.Context, bucket, key string) (*jobFollower, error) {
	kv, closeNC, err := openStatusKV(ctx)
	if err != nil {
		return nil, err
	}
	w, err := kv.Watch(ctx, events.StatusKey(bucket, key))
	if err != nil {
		closeNC()
		return nil, fmt.Errorf("watch status of %s/%s: %w", bucket, key, err)
	}
	f := &jobFollower{closeNC: closeNC, w: w, started: time.Now()}
	// The watcher first delivers the current record, then nil.
	for e := range w.Updates() {
		if e == nil {
			break
		}
		var st events.Status
		if json.Unmarshal(e.Value(), &st) == nil {
			f.before = &st
		}
	}
	return f, nil
}

func (f *jobFollower) close() {
	_ = f.w.Stop()
	f.closeNC()
}

// until follows the record until the job ends and returns its last state.
// A record belongs to this upload when it names the job id its content
// gives, or, should the converter have named it differently, a job other
// than the one before the upload, written after the upload began.
func (f *jobFollower) until(ctx context.Context, jobID string, out io.Writer) (events.Status, error) {
	var beforeID string
	if f.before != nil {
		beforeID = f.before.JobID
		// The same content uploaded again to the same key is the same
		// job; its end may already be on record, and nothing may change.
		if beforeID == jobID && f.before.State.Terminal() {
			return *f.before, nil
		}
	}
	p := newStateProgress(out)
	defer p.finish()
	for {
		select {
		case <-ctx.Done():
			return events.Status{}, ctx.Err()
		case e, ok := <-f.w.Updates():
			if !ok {
				return events.Status{}, errors.New("status watch ended")
			}
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue
			}
			var st events.Status
			if json.Unmarshal(e.Value(), &st) != nil {
				continue
			}
			ours := st.JobID == jobID || (st.JobID != beforeID && !st.UpdatedAt.Before(f.started.Add(-time.Minute)))
			if !ours {
				continue
			}
			p.show(st)
			if st.State.Terminal() {
				return st, nil
			}
		}
	}
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// byteProgress shows an upload's progress: a live bar on a terminal,
// a line every quarter otherwise, so that logs stay readable. minio-go
// feeds it the bytes it sends by reading from it, possibly from several
// goroutines.
type byteProgress struct {
	mu    sync.Mutex
	bar   *progressbar.ProgressBar
	w     io.Writer
	total int64
	done  int64
	next  int64
	label string
}

func newByteProgress(w io.Writer, total int64, label string) *byteProgress {
	p := &byteProgress{w: w, total: total, label: label, next: total / 4}
	if isTerminal(w) {
		p.bar = progressbar.NewOptions64(total,
			progressbar.OptionSetWriter(w),
			progressbar.OptionSetDescription(label),
			progressbar.OptionShowBytes(true),
			progressbar.OptionUseIECUnits(true),
			progressbar.OptionSetPredictTime(true),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionOnCompletion(func() { fmt.Fprintln(w) }),
		)
	}
	return p
}

func (p *byteProgress) Read(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := int64(len(b))
	p.done += n
	if p.bar != nil {
		_ = p.bar.Add64(n)
		return len(b), nil
	}
	for p.total > 0 && p.done >= p.next && p.next < p.total {
		fmt.Fprintf(p.w, "%s: %d%% (%s of %s)\n", p.label, 100*p.next/p.total, humanize.IBytes(uint64(p.next)), humanize.IBytes(uint64(p.total)))
		p.next += p.total / 4
	}
	return len(b), nil
}

func (p *byteProgress) finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bar != nil {
		_ = p.bar.Finish()
	}
}

// stateProgress shows a job's states: a bar for the percent of the stage
// on a terminal, a line per state (and per quarter of a conversion)
// otherwise.
type stateProgress struct {
	w         io.Writer
	bar       *progressbar.ProgressBar
	lastState events.State
	lastPct   int
}

func newStateProgress(w io.Writer) *stateProgress {
	p := &stateProgress{w: w, lastPct: -1}
	if isTerminal(w) {
		p.bar = progressbar.NewOptions(100,
			progressbar.OptionSetWriter(w),
			progressbar.OptionSetDescription("queued"),
			progressbar.OptionSetPredictTime(false),
			progressbar.OptionThrottle(100*time.Millisecond),
		)
	}
	return p
}

func (p *stateProgress) show(st events.Status) {
	if p.bar != nil {
		p.bar.Describe(strings.ToLower(string(st.State)))
		_ = p.bar.Set(int(st.Percent))
		return
	}
	pct := int(st.Percent) / 25 * 25
	if st.State == p.lastState && (st.State != events.StateConverting || pct == p.lastPct) {
		return
	}
	if st.State == events.StateConverting {
		fmt.Fprintf(p.w, "%s %d%%\n", st.State, pct)
	} else {
		fmt.Fprintln(p.w, st.State)
	}
	p.lastState, p.lastPct = st.State, pct
}

func (p *stateProgress) finish() {
	if p.bar != nil {
		_ = p.bar.Finish()
		fmt.Fprintln(p.w)
	}
}
