package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/minio/minio-go/v7"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/scratch"
)

const uploadLong = `Uploads FILE to the input bucket with a progress bar, then follows its
conversion (state and percent) until it is READY or FAILED, and prints
where the output is or what went wrong and what to do about it.

BUCKET/KEY defaults to the input bucket (IMAGEPIPE_INPUT_BUCKET, "uploads")
and the file's name; a KEY ending in "/" is a folder the file goes into.
Storage is reached with the IMAGEPIPE_S3_* settings, the job followed over
NATS (IMAGEPIPE_NATS_URL).

Exit codes: 0 converted (READY, or a duplicate of an earlier upload), 1
upload failed, conversion failed or was cancelled, 2 usage error.`

const uploadExample = `  imagepipe upload win11.vhdx
  imagepipe upload win11.vhdx uploads/disks/
  imagepipe upload web.vmdk uploads/vm/web.vmdk --format qcow2
  imagepipe upload --no-wait big.vhdx`

// uploadOptions are upload's flags.
type uploadOptions struct {
	noWait  bool
	format  string
	timeout time.Duration
	asJSON  bool
}

func newUploadCmd(e *cliEnv) *cobra.Command {
	var o uploadOptions
	c := &cobra.Command{
		Use:     "upload FILE [BUCKET/KEY]",
		Short:   "upload an image and follow its conversion",
		Long:    uploadLong,
		Example: uploadExample,
		Args:    argsBetween(1, 2, "FILE and an optional BUCKET/KEY"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runUpload(cmd.Context(), o, args, e.stdout, e.stderr)
		},
	}
	f := c.Flags()
	f.BoolVar(&o.noWait, "no-wait", false, "stop once the upload is done")
	f.StringVar(&o.format, "format", "", "output format for this upload: raw or qcow2 (default: the converter's IMAGEPIPE_OUTPUT_FORMAT)")
	f.DurationVar(&o.timeout, "timeout", 0, "give up following after this long (default: never)")
	f.BoolVar(&o.asJSON, "json", false, "print the final status record as JSON")
	return c
}

// runUpload uploads a file and follows its job.
func runUpload(ctx context.Context, o uploadOptions, pos []string, stdout, stderr io.Writer) error {
	if err := checkFormat("upload", o.format); err != nil {
		return err
	}
	if o.timeout < 0 {
		return usageError{fmt.Sprintf("upload: --timeout %s is negative; want a duration such as 30m", o.timeout)}
	}
	path := pos[0]
	var s settings
	var in uploadBucket
	if err := loadCommandSettings(&s.S3, &in); err != nil {
		return err
	}
	bucket, key := in.Name, filepath.Base(path)
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
	if o.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.timeout)
		defer cancel()
	}

	store, err := objstore.New(s.S3)
	if err != nil {
		return err
	}
	if err := checkReachable(ctx, store, s.S3, bucket); err != nil {
		return err
	}
	// Watching starts before the upload, so the record of an earlier
	// upload of the same key is known and a quick conversion is not missed.
	var follow *jobFollower
	if !o.noWait {
		if follow, err = newJobFollower(ctx, bucket, key); err != nil {
			return err
		}
		defer follow.close()
	}

	var meta map[string]string
	if o.format != "" {
		meta = map[string]string{events.MetaFormat: o.format}
	}
	// Read as convert reads its outputs: past the page cache, holes from
	// memory.
	f, err := scratch.Open(path)
	if err != nil {
		return fmt.Errorf("upload %s/%s: %w", bucket, key, err)
	}
	bar := newByteProgress(stderr, st.Size(), "uploading "+filepath.Base(path))
	obj, err := store.Upload(ctx, bucket, key, f, meta, bar, objstore.Guard{})
	f.Close()
	bar.finish()
	if err != nil {
		return err
	}
	fmt.Fprintf(stderr, "uploaded %s to %s/%s (%s)\n", path, bucket, key, humanize.IBytes(uint64(st.Size())))
	if o.noWait {
		if o.asJSON {
			return writeJSON(stdout, map[string]any{"bucket": bucket, "key": key, "size": st.Size(), "etag": obj.ETag})
		}
		fmt.Fprintf(stdout, "%s/%s\n", bucket, key)
		return nil
	}

	jobID := events.JobIDFor(events.ObjectIdentity(bucket, key, obj.VersionID, obj.ETag))
	final, err := follow.until(ctx, jobID, stderr)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("%s/%s is not converted within %s; follow it with: imagepipe status %s/%s --wait", bucket, key, o.timeout, bucket, key)
		}
		return err
	}
	if o.asJSON {
		if err := writeJSON(stdout, final); err != nil {
			return err
		}
	}
	switch final.State {
	case events.StateReady, events.StateDuplicate:
		if !o.asJSON {
			fmt.Fprintf(stdout, "%s/%s\n", final.OutputBucket, final.OutputKey)
		}
		return nil
	}
	return finalError(final)
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

// s3ProbeTimeout bounds how long upload waits for S3 to answer at all
// before it says nothing did; minio-go retries a refused connection, so a
// dead endpoint would otherwise surface only deep inside the upload.
const s3ProbeTimeout = 10 * time.Second

// checkReachable asks S3 about the bucket before anything is sent, so that
// an endpoint where nothing answers, or a missing bucket, is reported as
// such rather than as the failure of some later step of the upload.
func checkReachable(ctx context.Context, store *objstore.Store, cfg objstore.Config, bucket string) error {
	scheme := "http"
	if cfg.Secure {
		scheme = "https"
	}
	where := scheme + "://" + cfg.Endpoint
	pctx, cancel := context.WithTimeout(ctx, s3ProbeTimeout)
	defer cancel()
	found, err := store.Client().BucketExists(pctx, bucket)
	var resp minio.ErrorResponse
	switch {
	case err == nil && !found:
		return fmt.Errorf("bucket %q does not exist at %s: run imagepipe setup, or check IMAGEPIPE_INPUT_BUCKET and the BUCKET of BUCKET/KEY", bucket, where)
	case errors.As(err, &resp) && resp.StatusCode == http.StatusForbidden:
		// Without keys the AWS credential chain may have found none, and
		// the request went unsigned: say which settings sign it.
		return fmt.Errorf("S3 at %s refused access to bucket %q (%s): set IMAGEPIPE_S3_ACCESS_KEY and IMAGEPIPE_S3_SECRET_KEY (or their _FILE forms, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY) to keys allowed to write there", where, bucket, resp.Code)
	case err == nil, errors.As(err, &resp) && resp.StatusCode != 0:
		// S3 answered; what it thinks of the credentials is the upload's
		// to report.
		return nil
	case ctx.Err() != nil:
		return ctx.Err()
	}
	var cause error = err
	var uerr *url.Error
	if errors.As(err, &uerr) {
		cause = uerr.Err
	}
	if errors.Is(err, context.DeadlineExceeded) {
		cause = fmt.Errorf("no answer within %s", s3ProbeTimeout)
	}
	return fmt.Errorf("nothing answered at S3 endpoint %s (IMAGEPIPE_S3_ENDPOINT): %v; is MinIO running there, and is IMAGEPIPE_S3_SECURE right?", where, cause)
}
