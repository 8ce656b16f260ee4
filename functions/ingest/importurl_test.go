package ingest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"

	"github.com/imagepipe/imagepipe/events"
)

var importBody = bytes.Repeat([]byte("QFI\xfb disk bytes "), 1000)

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
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
			r := newRig(Config{})
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
			src := r.storage.objects["uploads/imports/disk.qcow2"].Metadata[MetaImportSource]
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
			r := newRig(Config{})
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
			if f.Rule != RuleSHA256Mismatch || f.Phase != events.PhaseIntake || !strings.Contains(f.Message, sum(importBody)) || !strings.Contains(f.Message, wrong) || f.WillRetry {
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
		r := newRig(Config{MaxInputSize: 1000})
		_, err := r.h.Import(context.Background(), events.ImportRequest{URL: serve(t, importBody, false).URL + "/files/disk.qcow2"})
		if !IsRequestError(err) || !strings.Contains(err.Error(), "IMAGEPIPE_MAX_INPUT_SIZE") {
			t.Errorf("err = %v, want a refusal naming the limit", err)
		}
	})
	t.Run("discovered while streaming", func(t *testing.T) {
		r := newRig(Config{MaxInputSize: 1000})
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
		r := newRig(Config{})
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
