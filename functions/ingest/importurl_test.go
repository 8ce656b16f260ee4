package ingest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/test/stack"
)

var importBody = bytes.Repeat([]byte("QFI\xfb disk bytes "), 1000)

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// loopbackAllowed opens the address and port rules to loopback, as an
// operator would with IMAGEPIPE_IMPORT_ALLOWED_NETWORKS and
// IMAGEPIPE_IMPORT_ALLOWED_PORTS=*, so that a test server can be fetched.
func loopbackAllowed(c Config) Config {
	c.ImportAllowedNetworks = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8"), netip.MustParsePrefix("::1/128")}
	c.ImportAllowedPorts = []PortRange{{1, 65535}}
	return c
}

// serve answers /disk.qcow2 with body, with a Content-Length unless chunked.
func serve(t *testing.T, body []byte, chunked bool) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/files/disk.qcow2" {
			http.NotFound(w, r)
			return
		}
		if !chunked {
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
			w.Write(body)
			return
		}
		for b := body; len(b) > 0; {
			n := min(len(b), 4096)
			w.Write(b[:n])
			w.(http.Flusher).Flush()
			b = b[n:]
		}
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestImportStreamsTheURLIntoTheInputBucket(t *testing.T) {
	for _, chunked := range []bool{false, true} {
		t.Run("chunked="+strconv.FormatBool(chunked), func(t *testing.T) {
			srv := serve(t, importBody, chunked)
			r := newRig(loopbackAllowed(Config{}))
			u := strings.Replace(srv.URL, "http://", "http://user:secret@", 1) + "/files/disk.qcow2?X-Amz-Signature=token"
			reply, err := r.h.Import(context.Background(), events.ImportRequest{URL: u, SHA256: strings.ToUpper(sum(importBody))})
			if err != nil {
				t.Fatal(err)
			}
			r.h.WaitImports()
			wantSize := int64(len(importBody))
			if chunked {
				wantSize = -1
			}
			if reply.Bucket != "uploads" || reply.Key != "imports/disk.qcow2" || reply.Size != wantSize || reply.ImportID == "" {
				t.Errorf("reply = %+v", reply)
			}
			if got := r.storage.bodies["uploads/imports/disk.qcow2"]; !bytes.Equal(got, importBody) {
				t.Errorf("stored %d bytes, want the %d served", len(got), len(importBody))
			}
			src := r.storage.objects["uploads/imports/disk.qcow2"].Metadata[events.MetaImportSource]
			if src != srv.URL+"/files/disk.qcow2" {
				t.Errorf("source metadata %q: want the URL without credentials or query", src)
			}
			if len(r.pub.all()) != 0 {
				t.Errorf("import published %d messages; the bucket notification makes the job", len(r.pub.all()))
			}
			if st, _ := r.status.record("uploads", "imports/disk.qcow2"); st.State != events.StateUploaded || strings.Contains(st.Message, "secret") || strings.Contains(st.Message, "token") {
				t.Errorf("status = %+v, want UPLOADED naming the source without secrets", st)
			}
		})
	}
}

func TestImportWithTheWrongDigestLeavesNoObject(t *testing.T) {
	for _, chunked := range []bool{false, true} {
		t.Run("chunked="+strconv.FormatBool(chunked), func(t *testing.T) {
			srv := serve(t, importBody, chunked)
			r := newRig(loopbackAllowed(Config{}))
			wrong := sum([]byte("something else"))
			if _, err := r.h.Import(context.Background(), events.ImportRequest{URL: srv.URL + "/files/disk.qcow2", Key: "in/d.qcow2", SHA256: wrong}); err != nil {
				t.Fatal(err)
			}
			r.h.WaitImports()
			if r.storage.has("uploads", "in/d.qcow2") {
				t.Error("an object was stored despite the digest mismatch")
			}
			msgs := r.pub.all()
			if len(msgs) != 1 || msgs[0].Subject != events.SubjectFailed {
				t.Fatalf("published %+v, want one failure", msgs)
			}
			f := decodeFailed(t, msgs[0])
			if f.Rule != events.RuleSHA256Mismatch || f.Phase != events.PhaseIntake || !strings.Contains(f.Message, sum(importBody)) || !strings.Contains(f.Message, wrong) || f.WillRetry {
				t.Errorf("failure = %+v", f)
			}
			if st, _ := r.status.record("uploads", "in/d.qcow2"); st.State != events.StateFailed || st.Message != f.Message {
				t.Errorf("status = %+v", st)
			}
		})
	}
}

func TestImportOverTheSizeLimitIsRefused(t *testing.T) {
	t.Run("announced", func(t *testing.T) {
		r := newRig(loopbackAllowed(Config{MaxInputSize: 1000}))
		_, err := r.h.Import(context.Background(), events.ImportRequest{URL: serve(t, importBody, false).URL + "/files/disk.qcow2"})
		if !IsRequestError(err) || !strings.Contains(err.Error(), "IMAGEPIPE_MAX_INPUT_SIZE") {
			t.Errorf("err = %v, want a refusal naming the limit", err)
		}
	})
	t.Run("discovered while streaming", func(t *testing.T) {
		r := newRig(loopbackAllowed(Config{MaxInputSize: 1000}))
		if _, err := r.h.Import(context.Background(), events.ImportRequest{URL: serve(t, importBody, true).URL + "/files/disk.qcow2"}); err != nil {
			t.Fatal(err)
		}
		r.h.WaitImports()
		msgs := r.pub.all()
		if r.storage.has("uploads", "imports/disk.qcow2") || len(msgs) != 1 || decodeFailed(t, msgs[0]).Rule != ReasonTooLarge {
			t.Errorf("stored %v, published %+v; want no object and a max-input-size failure", r.storage.has("uploads", "imports/disk.qcow2"), msgs)
		}
	})
}

func TestImportRefusesRequestsItCannotHonour(t *testing.T) {
	srv := serve(t, importBody, false)
	tests := []struct {
		req  events.ImportRequest
		want string
	}{
		{events.ImportRequest{URL: "ftp://example.com/a.qcow2"}, "only http and https"},
		{events.ImportRequest{URL: "http://"}, "names no host"},
		{events.ImportRequest{URL: "http://[::1"}, "is not a URL"},
		{events.ImportRequest{URL: srv.URL + "/"}, "names no file"},
		{events.ImportRequest{URL: srv.URL + "/files/disk.qcow2", Bucket: "images"}, `"images" is not the input bucket`},
		{events.ImportRequest{URL: srv.URL + "/files/disk.qcow2", Key: "notes.txt"}, "would not be converted (\"notes.txt\" does not name a disk image format"},
		{events.ImportRequest{URL: srv.URL + "/files/disk.qcow2", Key: "a/../b.qcow2"}, `".." segment`},
		{events.ImportRequest{URL: srv.URL + "/files/disk.qcow2", SHA256: "abc"}, "not a hex SHA-256"},
		{events.ImportRequest{URL: srv.URL + "/files/missing.qcow2"}, "answered 404"},
		{events.ImportRequest{URL: "http://user:secret@127.0.0.1:1/x.qcow2?sig=token"}, "could not be fetched"},
	}
	for _, tt := range tests {
		r := newRig(loopbackAllowed(Config{}))
		_, err := r.h.Import(context.Background(), tt.req)
		if !IsRequestError(err) || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Import(%+v) = %v, want a request error saying %q", tt.req, err, tt.want)
		}
		if err != nil && (strings.Contains(err.Error(), "secret") || strings.Contains(err.Error(), "token")) {
			t.Errorf("error repeats credentials: %v", err)
		}
		r.h.WaitImports()
		if len(r.storage.bodies) != 0 || len(r.pub.all()) != 0 {
			t.Errorf("Import(%+v) stored or published something", tt.req)
		}
	}
}

// A reader that stops at the announced length never sees EOF; the check
// must fail the read that completes the body.
func TestVerifyingReaderFailsBeforeHandingOnTheLastByte(t *testing.T) {
	body := []byte("0123456789")
	v := &verifyingReader{r: bytes.NewReader(body), expected: 10, limit: 100, want: sum([]byte("other")), h: sha256.New()}
	buf := make([]byte, 10)
	n, err := io.ReadFull(v, buf)
	if err == nil || n == 10 {
		t.Errorf("ReadFull = %d bytes, err %v; want the mismatch before the 10th byte", n, err)
	}
	ok := &verifyingReader{r: bytes.NewReader(body), expected: 10, limit: 100, want: sum(body), h: sha256.New()}
	if n, err := io.ReadFull(ok, buf); n != 10 || err != nil {
		t.Errorf("matching digest: %d bytes, err %v", n, err)
	}
	short := &verifyingReader{r: bytes.NewReader(body[:5]), expected: 10, limit: 100, h: sha256.New()}
	if _, err := io.ReadAll(short); err == nil || !strings.Contains(err.Error(), "5 of the 10 bytes") {
		t.Errorf("short body: err %v", err)
	}
}

func TestPartSizeLetsAnUnknownLengthReachTheLimit(t *testing.T) {
	for _, limit := range []int64{1, 1 << 30, 1 << 40, 5 << 40} {
		p := partSizeFor(limit)
		if p < 16<<20 || p%(16<<20) != 0 || int64(p)*10000 < limit {
			t.Errorf("partSizeFor(%d) = %d", limit, p)
		}
	}
	if p := partSizeFor(1 << 40); p > 128<<20 {
		t.Errorf("1 TiB limit buffers %d MiB parts", p>>20)
	}
}

// hostURL is srv's URL with its host replaced, keeping the port.
func hostURL(t *testing.T, srv *httptest.Server, host string) string {
	t.Helper()
	return stack.FileURL(t, srv, host, "disk.qcow2")
}

// countingServer serves importBody and counts the requests that reached it.
func countingServer(t *testing.T, network, addr string, h http.HandlerFunc) (*httptest.Server, *atomic.Int32) {
	t.Helper()
	return stack.DiskServer(t, network, addr, importBody, h)
}

// Every port is allowed here, so that only the address rule, checked by
// the dialler on the address actually dialled, stands between the import
// and the server.
func TestImportRefusesInternalAddressesAtDialTime(t *testing.T) {
	v4, hits4 := countingServer(t, "tcp4", "127.0.0.1:0", nil)
	v6, hits6 := countingServer(t, "tcp6", "[::1]:0", nil)
	anyPort := Config{ImportAllowedPorts: []PortRange{{1, 65535}}, ImportMaxRedirects: 5}
	for _, u := range []string{
		hostURL(t, v4, "127.0.0.1"),
		hostURL(t, v4, "localhost"), // a name that resolves to loopback
		hostURL(t, v4, "LocalHost"),
		hostURL(t, v6, "::1"),
		hostURL(t, v6, "::ffff:127.0.0.1"),
	} {
		r := newRig(anyPort)
		_, err := r.h.Import(context.Background(), events.ImportRequest{URL: u})
		if !IsRequestError(err) || !strings.Contains(err.Error(), "refused by rule import-address") || !strings.Contains(err.Error(), "loopback") {
			t.Errorf("Import(%s) = %v, want a refusal by rule import-address", u, err)
		}
		r.h.WaitImports()
		if len(r.storage.bodies) != 0 || len(r.pub.all()) != 0 {
			t.Errorf("Import(%s) stored or published something", u)
		}
	}
	if hits4.Load() != 0 || hits6.Load() != 0 {
		t.Errorf("the loopback servers were reached %d and %d times", hits4.Load(), hits6.Load())
	}
}

// The first hop is on a network the operator allowed; its redirect to
// another loopback address is dialled under the same rule and refused.
func TestImportRefusesARedirectToAnInternalAddress(t *testing.T) {
	target, targetHits := countingServer(t, "tcp4", "127.0.0.2:0", nil)
	target6, target6Hits := countingServer(t, "tcp6", "[::1]:0", nil)
	for _, to := range []string{hostURL(t, target, "127.0.0.2"), hostURL(t, target6, "::1")} {
		first, _ := countingServer(t, "tcp4", "127.0.0.1:0", func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, to+"?X-Amz-Signature=token", http.StatusFound)
		})
		r := newRig(Config{
			ImportAllowedNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")},
			ImportAllowedPorts:    []PortRange{{1, 65535}},
			ImportMaxRedirects:    5,
		})
		_, err := r.h.Import(context.Background(), events.ImportRequest{URL: hostURL(t, first, "127.0.0.1")})
		if !IsRequestError(err) || !strings.Contains(err.Error(), "refused by rule import-address") || !strings.Contains(err.Error(), "redirected to") || strings.Contains(err.Error(), "token") {
			t.Errorf("redirect to %s: %v, want a refusal by rule import-address naming the redirect without its query", to, err)
		}
		r.h.WaitImports()
		if len(r.storage.bodies) != 0 || len(r.pub.all()) != 0 {
			t.Errorf("redirect to %s stored or published something", to)
		}
	}
	if targetHits.Load() != 0 || target6Hits.Load() != 0 {
		t.Errorf("the redirect targets were reached %d and %d times", targetHits.Load(), target6Hits.Load())
	}
}

// A closed port, a connection closed before any answer and a TLS failure
// must read alike: the difference is what a port scan looks for.
func TestImportConnectionFailuresLookAlike(t *testing.T) {
	closed, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedAddr := closed.Addr().String()
	closed.Close()
	hangup, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { hangup.Close() })
	go func() {
		for {
			c, err := hangup.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	plain := serve(t, importBody, false)
	var msgs []string
	for _, u := range []string{
		"http://" + closedAddr + "/disk.qcow2",
		"http://" + hangup.Addr().String() + "/disk.qcow2",
		strings.Replace(plain.URL, "http://", "https://", 1) + "/disk.qcow2",
	} {
		r := newRig(loopbackAllowed(Config{}))
		_, err := r.h.Import(context.Background(), events.ImportRequest{URL: u, Key: "x/disk.qcow2"})
		if !IsRequestError(err) {
			t.Fatalf("Import(%s) = %v, want a request error", u, err)
		}
		msg := err.Error()
		// The URL and the import id differ; the rest must not.
		msg = msg[strings.Index(msg, " could not be fetched"):strings.LastIndex(msg, "import ")]
		for _, leak := range []string{"connection refused", "reset by peer", "EOF", "x509", "tls:", "i/o timeout", "dial tcp", "127.0.0.1"} {
			if strings.Contains(msg, leak) {
				t.Errorf("Import(%s) says %q, which tells the kind of failure", u, err)
			}
		}
		msgs = append(msgs, msg)
	}
	if msgs[0] != msgs[1] || msgs[1] != msgs[2] {
		t.Errorf("failures read differently:\n%s", strings.Join(msgs, "\n"))
	}
}

func TestImportDoesNotOverwriteAnExistingKeyUnlessAsked(t *testing.T) {
	srv := serve(t, importBody, false)
	old := objstore.Object{Bucket: "uploads", Key: "in/d.qcow2", Size: 3}
	r := newRig(loopbackAllowed(Config{}), old)
	r.storage.bodies["uploads/in/d.qcow2"] = []byte("old")
	_, err := r.h.Import(context.Background(), events.ImportRequest{URL: srv.URL + "/files/disk.qcow2", Key: "in/d.qcow2"})
	if !IsRequestError(err) || !strings.Contains(err.Error(), "refused by rule import-exists") || !strings.Contains(err.Error(), "--replace") {
		t.Errorf("err = %v, want a refusal by rule import-exists naming --replace", err)
	}
	r.h.WaitImports()
	if got := string(r.storage.bodies["uploads/in/d.qcow2"]); got != "old" {
		t.Errorf("the existing object was replaced without --replace")
	}
	if _, err := r.h.Import(context.Background(), events.ImportRequest{URL: srv.URL + "/files/disk.qcow2", Key: "in/d.qcow2", Replace: true}); err != nil {
		t.Fatal(err)
	}
	r.h.WaitImports()
	if got := r.storage.bodies["uploads/in/d.qcow2"]; !bytes.Equal(got, importBody) {
		t.Errorf("with Replace, stored %d bytes, want the %d served", len(got), len(importBody))
	}
}

// Over the cap an import is refused at once, not queued; the slot comes
// back when a transfer ends. A second import to a key being written is
// refused whatever the cap.
func TestImportsOverTheCapAreRefusedNotQueued(t *testing.T) {
	release := make(chan struct{})
	started := make(chan struct{}, 4)
	srv, _ := countingServer(t, "tcp4", "127.0.0.1:0", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(importBody)))
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		started <- struct{}{}
		<-release
		w.Write(importBody)
	})
	r := newRig(loopbackAllowed(Config{ImportMaxConcurrent: 2}))
	u := hostURL(t, srv, "127.0.0.1")
	for _, key := range []string{"a/1.qcow2", "a/2.qcow2"} {
		if _, err := r.h.Import(context.Background(), events.ImportRequest{URL: u, Key: key}); err != nil {
			t.Fatal(err)
		}
		<-started
	}
	_, err := r.h.Import(context.Background(), events.ImportRequest{URL: u, Key: "a/3.qcow2"})
	if !IsRequestError(err) || !strings.Contains(err.Error(), "refused by rule import-busy") || !strings.Contains(err.Error(), "try again later") {
		t.Errorf("third import: %v, want a refusal by rule import-busy", err)
	}
	close(release)
	r.h.WaitImports()
	if _, err := r.h.Import(context.Background(), events.ImportRequest{URL: u, Key: "a/3.qcow2"}); err != nil {
		t.Errorf("after the others ended: %v", err)
	}
	r.h.WaitImports()
	for _, key := range []string{"a/1.qcow2", "a/2.qcow2", "a/3.qcow2"} {
		if !bytes.Equal(r.storage.bodies["uploads/"+key], importBody) {
			t.Errorf("%s not stored", key)
		}
	}

	hold := make(chan struct{})
	srv2, _ := countingServer(t, "tcp4", "127.0.0.1:0", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(importBody)))
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		<-hold
		w.Write(importBody)
	})
	r2 := newRig(loopbackAllowed(Config{}))
	if _, err := r2.h.Import(context.Background(), events.ImportRequest{URL: hostURL(t, srv2, "127.0.0.1"), Key: "b/1.qcow2"}); err != nil {
		t.Fatal(err)
	}
	_, err = r2.h.Import(context.Background(), events.ImportRequest{URL: hostURL(t, srv2, "127.0.0.1"), Key: "b/1.qcow2", Replace: true})
	if !IsRequestError(err) || !strings.Contains(err.Error(), "refused by rule import-exists") || !strings.Contains(err.Error(), "already running") {
		t.Errorf("second import to one key: %v, want a refusal by rule import-exists", err)
	}
	close(hold)
	r2.h.WaitImports()
}

// HTTP_PROXY in the environment must not carry imports past the dialler.
func TestImportIgnoresProxiesFromTheEnvironment(t *testing.T) {
	proxy, proxyHits := countingServer(t, "tcp4", "127.0.0.1:0", nil)
	t.Setenv("HTTP_PROXY", proxy.URL)
	t.Setenv("http_proxy", proxy.URL)
	r := newRig(Config{ImportAllowedPorts: []PortRange{{1, 65535}}})
	_, err := r.h.Import(context.Background(), events.ImportRequest{URL: "http://127.0.0.1:9/disk.qcow2"})
	if !strings.Contains(fmt.Sprint(err), "refused by rule import-address") || proxyHits.Load() != 0 {
		t.Errorf("err %v, proxy reached %d times; want the address rule and no proxy", err, proxyHits.Load())
	}
}

// With IMAGEPIPE_IMPORT_PROXY every connection goes to the proxy (which
// may well sit on a private address), and a URL whose host is or resolves
// to an internal address is refused before the proxy is asked.
func TestImportThroughTheConfiguredProxy(t *testing.T) {
	proxy, proxyHits := countingServer(t, "tcp4", "127.0.0.1:0", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Host != "8.8.8.8" {
			http.Error(w, "unexpected target "+r.URL.Host, http.StatusBadGateway)
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(importBody)))
		w.Write(importBody)
	})
	r := newRig(Config{ImportProxy: mustURL(t, proxy.URL)})
	for _, u := range []string{"http://localhost/disk.qcow2", "http://127.0.0.1/disk.qcow2", "http://[::ffff:169.254.169.254]/disk.qcow2"} {
		_, err := r.h.Import(context.Background(), events.ImportRequest{URL: u})
		if !strings.Contains(fmt.Sprint(err), "refused by rule import-address") {
			t.Errorf("Import(%s) through the proxy: %v, want a refusal by rule import-address", u, err)
		}
	}
	if proxyHits.Load() != 0 {
		t.Errorf("the proxy was asked for internal addresses %d times", proxyHits.Load())
	}
	if _, err := r.h.Import(context.Background(), events.ImportRequest{URL: "http://8.8.8.8/disk.qcow2"}); err != nil {
		t.Fatal(err)
	}
	r.h.WaitImports()
	if proxyHits.Load() != 1 || !bytes.Equal(r.storage.bodies["uploads/imports/disk.qcow2"], importBody) {
		t.Errorf("proxy hits %d, stored %d bytes; want the body fetched through the proxy", proxyHits.Load(), len(r.storage.bodies["uploads/imports/disk.qcow2"]))
	}
}
