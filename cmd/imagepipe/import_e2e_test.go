package main

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caarlos0/env/v11"
	"github.com/minio/minio-go/v7"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/ingest"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/setup"
	"github.com/imagepipe/imagepipe/internal/status"
	"github.com/imagepipe/imagepipe/test/stack"
)

// allowLoopbackImports is the explicit opt-in the e2e stack's ingest runs
// with, as an operator would give it with
// IMAGEPIPE_IMPORT_ALLOWED_NETWORKS=127.0.0.0/8,::1/128 and
// IMAGEPIPE_IMPORT_ALLOWED_PORTS=*: the import tests serve from loopback.
// The tests below that prove the rules build their own ingest without it.
func allowLoopbackImports(c *ingest.Config) {
	c.ImportAllowedNetworks = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}
	c.ImportAllowedPorts = []ingest.PortRange{{Lo: 1, Hi: 65535}}
}

// shippedIngestConfig is ingest's configuration from an empty
// environment: exactly the defaults a deployment gets.
func shippedIngestConfig(t *testing.T) ingest.Config {
	t.Helper()
	var c ingest.Config
	if err := env.ParseWithOptions(&c, env.Options{Environment: map[string]string{}}); err != nil {
		t.Fatal(err)
	}
	return c
}

// ingestWith is a second ingest handler, with cfg, on the e2e stack's
// real MinIO, status bucket and result stream: the real import code, HTTP
// client and dialler included. It answers no notifications; the stack's
// own ingest does that for whatever this one stores.
func ingestWith(t *testing.T, cfg ingest.Config) *ingest.Handler {
	t.Helper()
	store, err := objstore.New(e2e.stack.s.S3)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := setup.StatusKV(context.Background(), e2e.js, 1)
	if err != nil {
		t.Fatal(err)
	}
	h := ingest.New(cfg, ingest.Deps{
		Status:  status.New(kv, e2e.nc),
		Storage: store,
		Publish: func(ctx context.Context, msgs ...events.Message) error { return natsrt.Publish(ctx, e2e.js, msgs...) },
	}, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	t.Cleanup(h.WaitImports)
	return h
}

// assertNothingArrives checks that key is not in the input bucket, nothing
// is under it in the output bucket, and no job was queued.
func assertNothingArrives(t *testing.T, key string, jobsBefore uint64) {
	t.Helper()
	if objectExists(t, "uploads", key) {
		t.Errorf("uploads/%s was stored", key)
	}
	if got := settledJobs(t) - jobsBefore; got != 0 {
		t.Errorf("%d jobs queued, want none", got)
	}
	for obj := range e2e.s3.ListObjects(context.Background(), "images", minio.ListObjectsOptions{Prefix: key, Recursive: true}) {
		if obj.Err == nil {
			t.Errorf("output images/%s appeared", obj.Key)
		}
	}
}

// secretDisks serves a disk that no import may fetch on a tcp4 address
// (v4Addr) and on [::1]; hits says how many requests each answered.
func secretDisks(t *testing.T, v4Addr string) (v4, v6 *httptest.Server, hits func() (int32, int32)) {
	t.Helper()
	body := []byte("QFI\xfb internal secret disk bytes")
	v4, hits4 := stack.DiskServer(t, "tcp4", v4Addr, body, nil)
	v6, hits6 := stack.DiskServer(t, "tcp6", "[::1]:0", body, nil)
	return v4, v6, func() (int32, int32) { return hits4.Load(), hits6.Load() }
}

func TestImportRefusesLoopbackAddressesWithoutTheOptIn(t *testing.T) {
	v4, v6, hits := secretDisks(t, "127.0.0.1:0")
	before := settledJobs(t)

	// Every port open, so the address rule alone is what refuses.
	cfg := shippedIngestConfig(t)
	cfg.ImportAllowedPorts = []ingest.PortRange{{Lo: 1, Hi: 65535}}
	h := ingestWith(t, cfg)
	for i, u := range []string{
		stack.FileURL(t, v4, "127.0.0.1", "a.qcow2"),
		stack.FileURL(t, v4, "localhost", "a.qcow2"),
		stack.FileURL(t, v6, "::1", "a.qcow2"),
		stack.FileURL(t, v6, "::ffff:127.0.0.1", "a.qcow2"),
	} {
		key := "e2e/import/address/" + strconv.Itoa(i) + ".qcow2"
		_, err := h.Import(context.Background(), events.ImportRequest{URL: u, Key: key})
		if !ingest.IsRequestError(err) || !strings.Contains(err.Error(), "refused by rule "+events.RuleImportAddress) {
			t.Errorf("import %s: %v, want a refusal by rule import-address", u, err)
		}
		assertNothingArrives(t, key, before)
	}

	// The shipped defaults alone refuse it too, by the port first.
	key := "e2e/import/address/defaults.qcow2"
	_, err := ingestWith(t, shippedIngestConfig(t)).Import(context.Background(), events.ImportRequest{URL: stack.FileURL(t, v4, "127.0.0.1", "a.qcow2"), Key: key})
	if !ingest.IsRequestError(err) || !strings.Contains(err.Error(), "refused by rule "+events.RuleImportPort) {
		t.Errorf("with the shipped defaults: %v, want a refusal by rule import-port", err)
	}
	assertNothingArrives(t, key, before)
	if h4, h6 := hits(); h4 != 0 || h6 != 0 {
		t.Errorf("the loopback servers answered %d and %d requests", h4, h6)
	}
}

// The first hop is allowed by the narrowest opt-in (its one address); the
// redirect to another loopback address is dialled under the same rule.
func TestImportRefusesARedirectToLoopback(t *testing.T) {
	inner, inner6, hits := secretDisks(t, "127.0.0.2:0")
	before := settledJobs(t)
	cfg := shippedIngestConfig(t)
	cfg.ImportAllowedNetworks = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	cfg.ImportAllowedPorts = []ingest.PortRange{{Lo: 1, Hi: 65535}}
	h := ingestWith(t, cfg)
	for i, target := range []string{stack.FileURL(t, inner, "127.0.0.2", "a.qcow2"), stack.FileURL(t, inner6, "::1", "a.qcow2")} {
		public, _ := stack.DiskServer(t, "tcp4", "127.0.0.1:0", nil, func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, target, http.StatusFound)
		})
		key := "e2e/import/redirect/" + strconv.Itoa(i) + ".qcow2"
		_, err := h.Import(context.Background(), events.ImportRequest{URL: stack.FileURL(t, public, "127.0.0.1", "a.qcow2"), Key: key})
		if !ingest.IsRequestError(err) || !strings.Contains(err.Error(), "refused by rule "+events.RuleImportAddress) || !strings.Contains(err.Error(), "redirected to") {
			t.Errorf("redirect to %s: %v, want a refusal by rule import-address at the redirect", target, err)
		}
		assertNothingArrives(t, key, before)
	}
	if h4, h6 := hits(); h4 != 0 || h6 != 0 {
		t.Errorf("the redirect targets answered %d and %d requests", h4, h6)
	}
}

// Through the CLI and the stack's own ingest (loopback allowed there).
func TestImportReplacesAnExistingUploadOnlyWithReplace(t *testing.T) {
	res := subscribeResults(t)
	first, second := smallQcow2(t, "first.qcow2", 0x31), smallQcow2(t, "second.qcow2", 0x32)
	bodies := map[string][]byte{}
	for name, path := range map[string]string{"first.qcow2": first, "second.qcow2": second} {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		bodies[name] = b
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, ok := bodies[strings.TrimPrefix(r.URL.Path, "/files/")]
		if !ok {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		w.Write(b)
	}))
	defer srv.Close()
	key := runPrefix("e2e/import/replace/") + "disk.qcow2"

	if code, _, stderr := cli(t, "import", srv.URL+"/files/first.qcow2", "uploads/"+key); code != 0 {
		t.Fatalf("first import: exit %d, %s", code, stderr)
	}
	wantFirst, _ := localRaw(t, first, "qcow2")
	if c := awaitConverted(t, res, key); c.SHA256 != wantFirst {
		t.Errorf("first output %s, want %s", c.SHA256, wantFirst)
	}

	before := settledJobs(t)
	code, _, stderr := cli(t, "import", srv.URL+"/files/second.qcow2", "uploads/"+key)
	if code != 1 || !strings.Contains(stderr, "refused by rule import-exists") || !strings.Contains(stderr, "--replace") {
		t.Errorf("import onto an existing key: exit %d, stderr %q; want a refusal by rule import-exists naming --replace", code, stderr)
	}
	if got, _ := downloadSum(t, "uploads", key); got != fileSum(t, first) {
		t.Errorf("the existing upload was replaced without --replace")
	}
	if got := settledJobs(t) - before; got != 0 {
		t.Errorf("%d jobs after the refused import, want none", got)
	}

	if code, _, stderr := cli(t, "import", "--replace", srv.URL+"/files/second.qcow2", "uploads/"+key); code != 0 {
		t.Fatalf("import --replace: exit %d, %s", code, stderr)
	}
	wantSecond, _ := localRaw(t, second, "qcow2")
	if c := awaitConverted(t, res, key); c.SHA256 != wantSecond {
		t.Errorf("output after --replace %s, want %s", c.SHA256, wantSecond)
	}
	if got, _ := downloadSum(t, "uploads", key); got != fileSum(t, second) {
		t.Errorf("--replace did not store the new body")
	}
}

func TestImportsOverTheReplicaCapAreRefusedNotQueued(t *testing.T) {
	body := []byte("QFI\xfb slow disk bytes")
	release := make(chan struct{})
	started := make(chan struct{}, 2)
	srv, _ := stack.DiskServer(t, "tcp4", "127.0.0.1:0", nil, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		started <- struct{}{}
		select {
		case <-release:
			w.Write(body)
		case <-r.Context().Done():
		}
	})
	cfg := shippedIngestConfig(t)
	allowLoopbackImports(&cfg)
	cfg.ImportMaxConcurrent = 1
	h := ingestWith(t, cfg)
	before := settledJobs(t)
	busy := runPrefix("e2e/import/busy/")

	if _, err := h.Import(context.Background(), events.ImportRequest{URL: stack.FileURL(t, srv, "127.0.0.1", "a.qcow2"), Key: busy + "1.qcow2"}); err != nil {
		t.Fatal(err)
	}
	<-started
	_, err := h.Import(context.Background(), events.ImportRequest{URL: stack.FileURL(t, srv, "127.0.0.1", "a.qcow2"), Key: busy + "2.qcow2"})
	if !ingest.IsRequestError(err) || !strings.Contains(err.Error(), "refused by rule "+events.RuleImportBusy) || !strings.Contains(err.Error(), "try again later") {
		t.Errorf("second import over a cap of 1: %v, want a refusal by rule import-busy", err)
	}
	close(release)
	h.WaitImports()
	if got, n := downloadSum(t, "uploads", busy+"1.qcow2"); n != int64(len(body)) {
		t.Errorf("first import stored %d bytes (%s), want %d", n, got, len(body))
	}
	if objectExists(t, "uploads", busy+"2.qcow2") {
		t.Error("the import refused as busy was stored later: it was queued")
	}
	// The first one is a real upload and becomes a (failed: not really a
	// qcow2) job; the refused one made none.
	if got := settledJobs(t) - before; got > 1 {
		t.Errorf("%d jobs, want at most the first import's", got)
	}
}

func TestAnIdleImportSourceIsCutOffAndNothingStored(t *testing.T) {
	res := subscribeResults(t)
	half := make([]byte, 256<<10)
	stop := make(chan struct{})
	defer close(stop)
	srv, _ := stack.DiskServer(t, "tcp4", "127.0.0.1:0", nil, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(2*len(half)))
		w.WriteHeader(http.StatusOK)
		w.Write(half)
		w.(http.Flusher).Flush()
		select { // and then nothing
		case <-stop:
		case <-r.Context().Done():
		}
	})
	cfg := shippedIngestConfig(t)
	allowLoopbackImports(&cfg)
	cfg.ImportIdleTimeout = 500 * time.Millisecond
	h := ingestWith(t, cfg)
	before := settledJobs(t)
	key := "e2e/import/idle/disk.qcow2"

	start := time.Now()
	if _, err := h.Import(context.Background(), events.ImportRequest{URL: stack.FileURL(t, srv, "127.0.0.1", "a.qcow2"), Key: key}); err != nil {
		t.Fatal(err)
	}
	f := awaitFailure(t, res, key)
	if f.Rule != events.RuleImportIdle || f.Phase != events.PhaseIntake || !strings.Contains(f.Message, "IMAGEPIPE_IMPORT_IDLE_TIMEOUT") {
		t.Errorf("failure %+v, want rule import-idle naming the setting", f)
	}
	if d := time.Since(start); d > 30*time.Second {
		t.Errorf("the idle source was cut off after %s", d)
	}
	h.WaitImports()
	if st := statusOf(t, "uploads", key); st.State != events.StateFailed {
		t.Errorf("state %s, want FAILED", st.State)
	}
	assertNothingArrives(t, key, before)
}

func TestAnUploadThatLandsWhileAnImportRunsIsKept(t *testing.T) {
	res := subscribeResults(t)
	// Larger than one part: the import completes a multipart upload, and
	// S3 checks its condition then. (A single PUT with a condition holds
	// the key's lock in MinIO while its body streams, and the racing
	// upload below would wait for it.)
	dir := t.TempDir()
	imported := makeImage(t, dir, "imported.qcow2", "qcow2", "write -P 0x41 0 24M")
	uploaded := smallQcow2(t, "uploaded.qcow2", 0x42)
	body, err := os.ReadFile(imported)
	if err != nil {
		t.Fatal(err)
	}
	halfSent, resume := make(chan struct{}), make(chan struct{})
	srv, _ := stack.DiskServer(t, "tcp4", "127.0.0.1:0", nil, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.WriteHeader(http.StatusOK)
		w.Write(body[:len(body)/2])
		w.(http.Flusher).Flush()
		close(halfSent)
		select {
		case <-resume:
			w.Write(body[len(body)/2:])
		case <-r.Context().Done():
		}
	})
	cfg := shippedIngestConfig(t)
	allowLoopbackImports(&cfg)
	h := ingestWith(t, cfg)
	key := runPrefix("e2e/import/race/") + "disk.qcow2"

	if _, err := h.Import(context.Background(), events.ImportRequest{URL: stack.FileURL(t, srv, "127.0.0.1", "a.qcow2"), Key: key}); err != nil {
		t.Fatal(err)
	}
	<-halfSent
	upload(t, key, uploaded, false)
	close(resume)
	h.WaitImports()

	var refused *events.Failed
	for range 2 { // the import's refusal, and the upload's own result
		ev := res.await(t, key, 60*time.Second)
		if ev.Type != events.TypeFailed {
			continue
		}
		var f events.Failed
		if err := ev.DecodeData(events.TypeFailed, &f); err != nil {
			t.Fatal(err)
		}
		refused = &f
		break
	}
	if refused == nil || refused.Rule != events.RuleImportExists || !strings.Contains(refused.Message, "kept") {
		t.Fatalf("import failure %+v, want a refusal by rule import-exists saying the upload was kept", refused)
	}
	if got, _ := downloadSum(t, "uploads", key); got != fileSum(t, uploaded) {
		t.Errorf("the upload that landed during the import was overwritten")
	}
}
