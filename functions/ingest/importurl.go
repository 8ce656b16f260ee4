package ingest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"path"
	"strings"
	"sync"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/google/uuid"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/objstore"
)

// ImportPrefix is where imports land when the request names no key.
const ImportPrefix = "imports/"

// errImportTimeout and errImportIdle are the causes that end a transfer's
// context when it ran too long or the source went quiet.
var (
	errImportTimeout = errors.New("import timeout")
	errImportIdle    = errors.New("import idle")
)

// importer runs one handler's imports: the HTTP client that holds every
// connection to the import rules, a slot per import that may run at once,
// and the keys being written, so two imports never race for one key.
type importer struct {
	rules   importRules
	client  *http.Client
	timeout time.Duration
	idle    time.Duration
	slots   chan struct{}

	mu      sync.Mutex
	keys    map[string]bool
	running sync.WaitGroup
}

func newImporter(c Config) *importer {
	im := &importer{
		rules:   newImportRules(c),
		timeout: positiveOr(c.ImportTimeout, DefaultImportTimeout),
		idle:    positiveOr(c.ImportIdleTimeout, DefaultImportIdleTimeout),
		slots:   make(chan struct{}, positiveOr(c.ImportMaxConcurrent, DefaultImportMaxConcurrent)),
		keys:    map[string]bool{},
	}
	im.client = im.rules.client(im.idle)
	return im
}

func positiveOr[T int | time.Duration](v, def T) T {
	if v > 0 {
		return v
	}
	return def
}

// claim takes a slot and the key for one import. Over the cap the import
// is refused at once rather than queued: a queue here would hold requests
// nobody sees, each with a connection open to its source.
func (im *importer) claim(bucket, key string) (release func(), err error) {
	select {
	case im.slots <- struct{}{}:
	default:
		return nil, refusal(events.RuleImportBusy,
			fmt.Sprintf("this ingest replica already runs %d imports (IMAGEPIPE_IMPORT_MAX_CONCURRENT)", cap(im.slots)),
			"try again later")
	}
	im.mu.Lock()
	defer im.mu.Unlock()
	if im.keys[bucket+"/"+key] {
		<-im.slots
		return nil, refusal(events.RuleImportExists, fmt.Sprintf("an import to %s/%s is already running", bucket, key),
			"wait for it to end (imagepipe status "+bucket+"/"+key+"), or choose another key")
	}
	im.keys[bucket+"/"+key] = true
	return func() {
		im.mu.Lock()
		delete(im.keys, bucket+"/"+key)
		im.mu.Unlock()
		<-im.slots
	}, nil
}

// bound is the context of one import: IMAGEPIPE_IMPORT_TIMEOUT bounds the
// whole of it, and abort ends it early with a cause (the idle watch's).
func (im *importer) bound(ctx context.Context) (_ context.Context, abort context.CancelCauseFunc, done func()) {
	ctx, abort = context.WithCancelCause(ctx)
	ctx, cancel := context.WithTimeoutCause(ctx, im.timeout, errImportTimeout)
	return ctx, abort, func() { cancel(); abort(nil) }
}

// Import checks the request, opens the URL, and then streams the body into
// the input bucket in the background, under ctx rather than the request's
// lifetime: a 40 GiB import must not depend on the asker staying
// connected. From there the normal flow takes over: the bucket notifies,
// ingest queues a job. A failed transfer is reported like any refused
// upload, with a failure event and a FAILED state for the key.
func (h *Handler) Import(ctx context.Context, req events.ImportRequest) (events.ImportReply, error) {
	if h.deps.Storage == nil || h.deps.Publish == nil {
		return events.ImportReply{}, errors.New("import: no storage or publisher configured")
	}
	src, err := url.Parse(req.URL)
	switch {
	case err != nil:
		return events.ImportReply{}, requestErrorf("import: %q is not a URL", req.URL)
	case src.Host == "" && (src.Scheme == "http" || src.Scheme == "https"):
		return events.ImportReply{}, requestErrorf("import: %q names no host", redact(src))
	}
	if err := h.imports.rules.checkURL(src); err != nil {
		return events.ImportReply{}, h.importRefused(src, nil, err, h.log)
	}
	bucket, key, err := h.importTarget(req, src)
	if err != nil {
		return events.ImportReply{}, err
	}
	want := strings.ToLower(strings.TrimSpace(req.SHA256))
	if want != "" {
		if b, err := hex.DecodeString(want); err != nil || len(b) != sha256.Size {
			return events.ImportReply{}, requestErrorf("import: %q is not a hex SHA-256 digest", req.SHA256)
		}
	}

	release, err := h.imports.claim(bucket, key)
	if err != nil {
		return events.ImportReply{}, h.importRefused(src, nil, err, h.log)
	}
	started := false
	defer func() {
		if !started {
			release()
		}
	}()
	if err := h.refuseOverwrite(ctx, src, bucket, key, req.Replace); err != nil {
		return events.ImportReply{}, err
	}

	id := uuid.NewString()
	log := h.log.With("import", id, "bucket", bucket, "key", key, "url", redact(src))
	tctx, abort, done := h.imports.bound(ctx)
	resp, err := h.open(tctx, src, id, log)
	if err != nil {
		done()
		return events.ImportReply{}, err
	}
	size := resp.ContentLength
	switch {
	case size == 0:
		resp.Body.Close()
		done()
		return events.ImportReply{}, requestErrorf("import: %s is empty", redact(src))
	case size > h.cfg.MaxInputSize:
		resp.Body.Close()
		done()
		return events.ImportReply{}, requestErrorf("import: %s: %v", redact(src), h.tooLarge(size).Err)
	}

	reply := events.ImportReply{ImportID: id, Bucket: bucket, Key: key, Size: size}
	st := events.Status{Bucket: bucket, Key: key, JobID: id, State: events.StateUploaded,
		Message: "importing from " + redact(src), UpdatedAt: h.now().UTC()}
	if err := h.deps.Status.Set(ctx, st); err != nil {
		log.Warn("status not recorded", "err", err)
	}
	log.Info("importing", "stage", "import", "size", size)
	body := newIdleReader(resp.Body, h.imports.idle, func() { abort(errImportIdle) })
	started = true
	h.imports.running.Go(func() {
		defer release()
		defer done()
		defer resp.Body.Close()
		h.transfer(tctx, reply, src, body, want, req.Replace, log)
	})
	return reply, nil
}

// WaitImports waits for the transfers in progress to end.
func (h *Handler) WaitImports() { h.imports.running.Wait() }

// importTarget is the bucket and key an import writes: the input bucket,
// and a key the ingest rules would convert.
func (h *Handler) importTarget(req events.ImportRequest, src *url.URL) (bucket, key string, err error) {
	bucket, key = req.Bucket, req.Key
	if bucket == "" {
		bucket = h.cfg.InputBucket
	}
	if bucket != h.cfg.InputBucket {
		return "", "", requestErrorf("import: %q is not the input bucket; imports go to %q", bucket, h.cfg.InputBucket)
	}
	if key == "" {
		name := path.Base(src.Path)
		if name == "/" || name == "." || name == "" {
			return "", "", requestErrorf("import: %s names no file; give BUCKET/KEY", redact(src))
		}
		key = ImportPrefix + name
	}
	if v := h.keyVerdict(key); v.skip != "" || v.refuse != nil {
		why := v.skip
		if v.refuse != nil {
			why = v.refuse.Err.Error()
		}
		return "", "", requestErrorf("import: %s/%s would not be converted (%s); choose another key", bucket, key, why)
	}
	return bucket, key, nil
}

// refuseOverwrite refuses an import onto an existing object unless the
// request says to replace it: an import is a second way to write the
// input bucket, and must not silently destroy what an upload put there.
// (An upload racing the import can still land first; this is the check
// a person who mistyped a key needs.)
func (h *Handler) refuseOverwrite(ctx context.Context, src *url.URL, bucket, key string, replace bool) error {
	if replace {
		return nil
	}
	_, err := h.deps.Storage.Stat(ctx, bucket, key)
	switch {
	case objstore.IsNotFound(err):
		return nil
	case err != nil:
		return fmt.Errorf("import: check whether %s/%s exists: %w", bucket, key, err)
	}
	return h.importRefused(src, nil, refusal(events.RuleImportExists, fmt.Sprintf("%s/%s exists", bucket, key),
		"import with --replace (\"replace\": true) to overwrite it, or choose another key"), h.log)
}

// open sends the request and returns the answer of the last hop. Its
// errors name a rule or say only that no answer came: which of refused,
// reset, timed out or a TLS failure it was would tell the asker whether
// something listens there, so only the log says.
func (h *Handler) open(ctx context.Context, src *url.URL, id string, log *slog.Logger) (*http.Response, error) {
	if h.imports.rules.proxy != nil {
		if err := h.imports.rules.checkResolved(ctx, src.Hostname()); err != nil {
			return nil, h.importRefused(src, nil, err, log)
		}
	}
	hreq, err := http.NewRequestWithContext(ctx, http.MethodGet, src.String(), nil)
	if err != nil {
		return nil, requestErrorf("import: %s: not a request that can be sent", redact(src))
	}
	resp, err := h.imports.client.Do(hreq)
	if err != nil {
		var at *url.URL
		var ue *url.Error
		if errors.As(err, &ue) {
			at, _ = url.Parse(ue.URL)
		}
		var ref *importRefusal
		if errors.As(err, &ref) {
			return nil, h.importRefused(src, at, ref, log)
		}
		// Before any answer, an abort or the deadline is the source's
		// silence too: say so in the same words.
		log.Warn("import source did not answer", "stage", "import", "at", redactedOrEmpty(at), "err", redactErr(err, src), "cause", context.Cause(ctx))
		return nil, requestErrorf("import: %s could not be fetched: no HTTP answer came (a refused or failed connection, a timeout and a TLS failure look alike from here; the ingest log says which, under import %s)", redact(src), id)
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, requestErrorf("import: %s answered %s", redact(src), resp.Status)
	}
	return resp, nil
}

// importRefused turns a refusal into the asker's error and logs it, with
// the redirect hop it happened at when that is not the URL asked for.
func (h *Handler) importRefused(src, at *url.URL, err error, log *slog.Logger) error {
	var ref *importRefusal
	if !errors.As(err, &ref) {
		return err
	}
	where := redact(src)
	if at != nil && redact(at) != where {
		where += " (redirected to " + redact(at) + ")"
	}
	log.Warn("import refused", "stage", "import", "rule", ref.Rule, "url", where, "reason", ref.Reason, "address", ref.addr)
	msg := fmt.Sprintf("import: %s: %v", where, ref)
	if ref.Suggestion != "" {
		msg += "; " + ref.Suggestion
	}
	return &RequestError{Msg: msg}
}

func redactedOrEmpty(u *url.URL) string {
	if u == nil {
		return ""
	}
	return redact(u)
}

// idleReader aborts an import when one read waits on the source longer
// than d. Only the wait on the source counts, not the time the uploader
// spends between reads: a slow bucket is not an idle source.
type idleReader struct {
	r     io.Reader
	d     time.Duration
	timer *time.Timer
}

func newIdleReader(r io.Reader, d time.Duration, stalled func()) *idleReader {
	t := time.AfterFunc(d, stalled)
	t.Stop()
	return &idleReader{r: r, d: d, timer: t}
}

func (i *idleReader) Read(p []byte) (int, error) {
	i.timer.Reset(i.d)
	n, err := i.r.Read(p)
	i.timer.Stop()
	return n, err
}

// transfer streams body into the bucket. The digest and the size limit are
// checked as the bytes pass, and a failing check fails the read that would
// deliver the last byte: S3 creates an object, and MinIO notifies, only when
// an upload completes, so a failed upload leaves nothing behind — no
// temporary key, no server-side copy of a 40 GiB object, no notification to
// take back.
func (h *Handler) transfer(ctx context.Context, r events.ImportReply, src *url.URL, body io.Reader, want string, replace bool, log *slog.Logger) {
	start := h.now()
	vr := &verifyingReader{r: body, expected: r.Size, limit: h.cfg.MaxInputSize, want: want, h: sha256.New()}
	var partSize uint64
	if r.Size < 0 {
		partSize = partSizeFor(h.cfg.MaxInputSize)
	}
	// Without replace, the object is stored only if nothing was at the key
	// when the import completes: an upload that landed meanwhile stays.
	err := h.deps.Storage.PutStream(ctx, r.Bucket, r.Key, vr, r.Size, partSize, map[string]string{events.MetaImportSource: redact(src)}, !replace)
	// A failed upload may return while its sender still reads the body;
	// what the reader found is taken under its lock.
	n, verr := vr.result()
	if err == nil {
		log.Info("imported", "stage", "import", "size", n, "sha256", vr.sum(), "duration", h.now().Sub(start))
		return
	}
	// The uploader may or may not wrap the reader's error; the reader
	// keeps its own.
	fe, ok := failure.As(verr)
	cause := context.Cause(ctx)
	switch {
	case ok:
	case errors.Is(cause, errImportIdle):
		fe = failure.Refused(events.PhaseIntake, events.RuleImportIdle,
			fmt.Errorf("the source sent nothing for %s (IMAGEPIPE_IMPORT_IDLE_TIMEOUT) after %d bytes", h.imports.idle, n),
			"check the source serves the file steadily, then import it again; nothing was stored")
	case errors.Is(cause, errImportTimeout):
		fe = failure.Refused(events.PhaseIntake, events.RuleImportTimeout,
			fmt.Errorf("the import took longer than %s (IMAGEPIPE_IMPORT_TIMEOUT)", h.imports.timeout),
			"import from a faster source, or raise IMAGEPIPE_IMPORT_TIMEOUT on the ingest function; nothing was stored")
	case verr != nil:
		fe = failure.Refused(events.PhaseIntake, events.RuleImportSource, verr, "check the URL serves the whole file, then import it again")
	case objstore.IsChanged(err):
		fe = failure.Refused(events.PhaseIntake, events.RuleImportExists,
			fmt.Errorf("%s/%s was stored by another upload while the import ran; that upload was kept", r.Bucket, r.Key),
			"import again with --replace (\"replace\": true) to overwrite it, or choose another key")
	default:
		fe = failure.Permanent(events.PhaseIntake, fmt.Errorf("upload of %s to %s/%s failed: %w", redact(src), r.Bucket, r.Key, redactErr(err, src)),
			"import it again; nothing was stored")
	}
	log.Warn("import failed", "stage", "import", "rule", fe.Rule, "err", fe.Err, "bytes", n)
	// The transfer's context may be what ended it; the report still goes out.
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	msg, err := h.refuse(rctx, candidate{Bucket: r.Bucket, Key: r.Key}, r.ImportID, r.ImportID, fe)
	if err == nil {
		err = h.deps.Publish(rctx, msg)
	}
	if err != nil {
		log.Warn("import failure not reported", "err", err)
	}
}

// verifyingReader hashes and counts what passes through and turns a wrong
// digest, a body over the limit or a short body into a read error before
// the last byte is handed on.
type verifyingReader struct {
	r        io.Reader
	expected int64 // -1 when unknown
	limit    int64
	want     string

	mu  sync.Mutex // held by Read past the source's read, and by result
	h   hash.Hash
	n   int64
	err error // the verification failure, once there is one
}

// result is how many bytes passed and the verification failure, if any.
func (v *verifyingReader) result() (int64, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.n, v.err
}

// sum is the hex sha256 of what passed.
func (v *verifyingReader) sum() string {
	v.mu.Lock()
	defer v.mu.Unlock()
	return hex.EncodeToString(v.h.Sum(nil))
}

func (v *verifyingReader) Read(p []byte) (int, error) {
	if _, err := v.result(); err != nil {
		return 0, err
	}
	n, err := v.r.Read(p)
	v.mu.Lock()
	defer v.mu.Unlock()
	v.h.Write(p[:n])
	v.n += int64(n)
	if v.n > v.limit {
		v.err = failure.Refused(events.PhaseIntake, ReasonTooLarge,
			fmt.Errorf("the source sent more than the %s (%d bytes) limit set by IMAGEPIPE_MAX_INPUT_SIZE", humanize.IBytes(uint64(v.limit)), v.limit),
			"compress the image, or raise IMAGEPIPE_MAX_INPUT_SIZE on the ingest function if images this large are expected")
		return 0, v.err
	}
	if v.expected >= 0 && v.n > v.expected {
		v.err = fmt.Errorf("the source sent more than the %d bytes it announced", v.expected)
		return 0, v.err
	}
	// With a known length the uploader may stop reading at the last
	// byte and never see EOF, so the end is that byte, not EOF.
	end := errors.Is(err, io.EOF) || v.expected >= 0 && v.n == v.expected
	if errors.Is(err, io.EOF) && v.expected >= 0 && v.n < v.expected {
		v.err = fmt.Errorf("the source sent %d of the %d bytes it announced", v.n, v.expected)
		return 0, v.err
	}
	if end && v.want != "" {
		if got := hex.EncodeToString(v.h.Sum(nil)); got != v.want {
			v.err = failure.Refused(events.PhaseIntake, events.RuleSHA256Mismatch,
				fmt.Errorf("the downloaded body's sha256 is %s, not the expected %s", got, v.want),
				"check the URL and the expected digest; the source may have changed")
			return 0, v.err
		}
	}
	return n, err
}

// partSizeFor is the part size that lets an upload of unknown length reach
// limit in S3's 10,000 parts, in multiples of 16 MiB, at least 16 MiB: the
// uploader buffers one part, so it is also the memory an import takes.
func partSizeFor(limit int64) uint64 {
	const step = 16 << 20
	per := (limit + 9999) / 10000
	parts := (per + step - 1) / step
	return uint64(max(parts, 1) * step)
}

// redact drops credentials, query and fragment: a presigned URL's query is
// a bearer token.
func redact(u *url.URL) string {
	c := url.URL{Scheme: u.Scheme, Host: u.Host, Path: u.Path}
	return c.String()
}

// redactErr keeps an error's words but not the URL it may quote.
func redactErr(err error, u *url.URL) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return fmt.Errorf("%s", strings.ReplaceAll(ue.Err.Error(), u.String(), redact(u)))
	}
	return errors.New(strings.ReplaceAll(err.Error(), u.String(), redact(u)))
}
