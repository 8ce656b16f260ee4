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
	"net"
	"net/http"
	"net/url"
	"path"
	"strings"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/google/uuid"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
)

// ImportPrefix is where imports land when the request names no key.
const ImportPrefix = "imports/"

// MetaImportSource records where an imported object came from (scheme,
// host and path; never credentials or a query, which may hold a token).
const MetaImportSource = "imagepipe-import-source"

// Rules of a failed import, named in its failure event.
const (
	RuleSHA256Mismatch = "sha256-mismatch"
	RuleImportSource   = "import-source"
)

func defaultHTTPClient() *http.Client {
	return &http.Client{Transport: &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout:   30 * time.Second,
		ResponseHeaderTimeout: time.Minute,
		// An image is already compressed or incompressible; a gzip
		// transfer encoding would hide the real length.
		DisableCompression: true,
	}}
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
	case src.Scheme != "http" && src.Scheme != "https":
		return events.ImportReply{}, requestErrorf("import: %s: only http and https URLs are imported", redact(src))
	case src.Host == "":
		return events.ImportReply{}, requestErrorf("import: %q names no host", req.URL)
	}
	bucket, key := req.Bucket, req.Key
	if bucket == "" {
		bucket = h.cfg.InputBucket
	}
	if bucket != h.cfg.InputBucket {
		return events.ImportReply{}, requestErrorf("import: %q is not the input bucket; imports go to %q", bucket, h.cfg.InputBucket)
	}
	if key == "" {
		name := path.Base(src.Path)
		if name == "/" || name == "." || name == "" {
			return events.ImportReply{}, requestErrorf("import: %s names no file; give BUCKET/KEY", redact(src))
		}
		key = ImportPrefix + name
	}
	if v := h.keyVerdict(key); v.skip != "" || v.refuse != nil {
		why := v.skip
		if v.refuse != nil {
			why = v.refuse.Err.Error()
		}
		return events.ImportReply{}, requestErrorf("import: %s/%s would not be converted (%s); choose another key", bucket, key, why)
	}
	want := strings.ToLower(strings.TrimSpace(req.SHA256))
	if want != "" {
		if b, err := hex.DecodeString(want); err != nil || len(b) != sha256.Size {
			return events.ImportReply{}, requestErrorf("import: %q is not a hex SHA-256 digest", req.SHA256)
		}
	}

	resp, err := h.open(ctx, src)
	if err != nil {
		return events.ImportReply{}, err
	}
	size := resp.ContentLength
	switch {
	case size == 0:
		resp.Body.Close()
		return events.ImportReply{}, requestErrorf("import: %s is empty", redact(src))
	case size > h.cfg.MaxInputSize:
		resp.Body.Close()
		return events.ImportReply{}, requestErrorf("import: %s: %v", redact(src), h.tooLarge(size).Err)
	}

	id := uuid.NewString()
	reply := events.ImportReply{ImportID: id, Bucket: bucket, Key: key, Size: size}
	log := h.log.With("import", id, "bucket", bucket, "key", key, "url", redact(src))
	st := events.Status{Bucket: bucket, Key: key, JobID: id, State: events.StateUploaded,
		Message: "importing from " + redact(src), UpdatedAt: h.now().UTC()}
	if err := h.deps.Status.Set(ctx, st); err != nil {
		log.Warn("status not recorded", "err", err)
	}
	log.Info("importing", "stage", "import", "size", size)
	h.imports.Go(func() {
		defer resp.Body.Close()
		h.transfer(ctx, reply, src, resp.Body, want, log)
	})
	return reply, nil
}

// WaitImports waits for the transfers in progress to end.
func (h *Handler) WaitImports() { h.imports.Wait() }

func (h *Handler) open(ctx context.Context, src *url.URL) (*http.Response, error) {
	hreq, err := http.NewRequestWithContext(ctx, http.MethodGet, src.String(), nil)
	if err != nil {
		return nil, requestErrorf("import: %s: %v", redact(src), err)
	}
	resp, err := h.deps.HTTP.Do(hreq)
	if err != nil {
		// The URL may hold credentials or a token; the error repeats it.
		return nil, requestErrorf("import: %s could not be fetched: %v", redact(src), redactErr(err, src))
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		return nil, requestErrorf("import: %s answered %s", redact(src), resp.Status)
	}
	return resp, nil
}

// transfer streams body into the bucket. The digest and the size limit are
// checked as the bytes pass, and a failing check fails the read that would
// deliver the last byte: S3 creates an object, and MinIO notifies, only when
// an upload completes, so a failed upload leaves nothing behind — no
// temporary key, no server-side copy of a 40 GiB object, no notification to
// take back.
func (h *Handler) transfer(ctx context.Context, r events.ImportReply, src *url.URL, body io.Reader, want string, log *slog.Logger) {
	start := h.now()
	vr := &verifyingReader{r: body, expected: r.Size, limit: h.cfg.MaxInputSize, want: want, h: sha256.New()}
	var partSize uint64
	if r.Size < 0 {
		partSize = partSizeFor(h.cfg.MaxInputSize)
	}
	err := h.deps.Storage.PutStream(ctx, r.Bucket, r.Key, vr, r.Size, partSize, map[string]string{MetaImportSource: redact(src)})
	if err == nil {
		log.Info("imported", "stage", "import", "size", vr.n, "sha256", hex.EncodeToString(vr.h.Sum(nil)), "duration", h.now().Sub(start))
		return
	}
	// The uploader may or may not wrap the reader's error; the reader
	// keeps its own.
	fe, ok := failure.As(vr.err)
	switch {
	case ok:
	case vr.err != nil:
		fe = failure.Refused(events.PhaseIntake, RuleImportSource, vr.err, "check the URL serves the whole file, then import it again")
	default:
		fe = failure.Permanent(events.PhaseIntake, fmt.Errorf("upload of %s to %s/%s failed: %w", redact(src), r.Bucket, r.Key, redactErr(err, src)),
			"import it again; nothing was stored")
	}
	log.Warn("import failed", "stage", "import", "rule", fe.Rule, "err", fe.Err, "bytes", vr.n)
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
	h        hash.Hash
	n        int64
	err      error // the verification failure, once there is one
}

func (v *verifyingReader) Read(p []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	n, err := v.r.Read(p)
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
			v.err = failure.Refused(events.PhaseIntake, RuleSHA256Mismatch,
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
