package control_test

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/control"
)

// fakeIntake stands in for ingest's handler: the service only decodes,
// relays and answers, and ingest's own tests cover what the calls do.
type fakeIntake struct {
	reconvert func(context.Context, events.ReconvertRequest) (string, error)
	imp       func(context.Context, events.ImportRequest) (events.ImportReply, error)
	reconcile func(context.Context, events.ReconcileRequest) (events.ReconcileResult, error)
}

var _ control.Intake = (*fakeIntake)(nil)

func (f *fakeIntake) Reconvert(ctx context.Context, r events.ReconvertRequest) (string, error) {
	return f.reconvert(ctx, r)
}
func (f *fakeIntake) Import(ctx context.Context, r events.ImportRequest) (events.ImportReply, error) {
	return f.imp(ctx, r)
}
func (f *fakeIntake) HandleReconcile(ctx context.Context, r events.ReconcileRequest) (events.ReconcileResult, error) {
	return f.reconcile(ctx, r)
}
func (f *fakeIntake) Stats() map[string]uint64 { return map[string]uint64{"imports": 7} }

// refusal is the asker's mistake, as ingest's RequestError is.
type refusal struct{ msg string }

func (r *refusal) Error() string { return r.msg }

func isRefusal(err error) bool {
	var r *refusal
	return errors.As(err, &r)
}

// serveIntake runs an intake service on its own connection, as an ingest
// process would, until the test ends.
func serveIntake(t *testing.T, url string, in control.Intake, importCtx context.Context) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	err := control.ServeIntake(ctx, connect(t, url), control.IntakeOptions{
		Intake: in, ImportContext: importCtx, IsRequestError: isRefusal, Version: "1.2.3",
	})
	if err != nil {
		t.Fatal(err)
	}
}

// rawRequest sends body as `nats req` would and returns the answer.
func rawRequest(t *testing.T, nc *nats.Conn, subject, body string) *nats.Msg {
	t.Helper()
	msg, err := nc.Request(subject, []byte(body), 30*time.Second)
	if err != nil {
		t.Fatalf("request on %s: %v", subject, err)
	}
	return msg
}

func TestIntakeAnswersRefusalsWithMicroHeadersAndAnErrorBody(t *testing.T) {
	s := startNATS(t)
	serveIntake(t, s.url, &fakeIntake{
		reconvert: func(_ context.Context, r events.ReconvertRequest) (string, error) {
			if r.Key == "missing" {
				return "", &refusal{"no object uploads/missing; upload it first"}
			}
			return "", errors.New("status store unreachable")
		},
	}, context.Background())

	for _, tt := range []struct {
		body, code, desc string
	}{
		{`{"bucket":"uploads","key":"missing"}`, "400", "no object uploads/missing; upload it first"},
		{`{"bucket":"uploads","key":"other"}`, "500", "status store unreachable"},
		{`{"bucket":`, "400", "the request is not valid JSON"},
	} {
		msg := rawRequest(t, s.nc, events.SubjectReconvert, tt.body)
		var body events.ErrorReply
		if err := json.Unmarshal(msg.Data, &body); err != nil {
			t.Fatalf("%s: body %q is not {\"error\": ...}: %v", tt.body, msg.Data, err)
		}
		code, desc := msg.Header.Get(micro.ErrorCodeHeader), msg.Header.Get(micro.ErrorHeader)
		if code != tt.code || !strings.HasPrefix(desc, tt.desc) || body.Error != desc {
			t.Errorf("%s: answered code %q, description %q, body %q; want code %s and %q in both", tt.body, code, desc, msg.Data, tt.code, tt.desc)
		}
	}

	// The client turns a refusal into its message alone, one plain line.
	_, err := control.NewClient(s.nc, 30*time.Second).Reconvert(context.Background(), events.ReconvertRequest{Bucket: "uploads", Key: "missing"})
	if err == nil || err.Error() != "no object uploads/missing; upload it first" {
		t.Errorf("client error = %v, want the refusal's message as it is", err)
	}
}

func TestIntakeRequestsReachOneReplicaEachAndImportsOutliveTheirRequest(t *testing.T) {
	s := startNATS(t)
	type key struct{}
	importCtx := context.WithValue(context.Background(), key{}, "imports")
	var reconverts, imports atomic.Int32
	var mu sync.Mutex
	var deadlines []bool
	in := &fakeIntake{
		reconvert: func(ctx context.Context, r events.ReconvertRequest) (string, error) {
			reconverts.Add(1)
			_, ok := ctx.Deadline()
			mu.Lock()
			deadlines = append(deadlines, ok)
			mu.Unlock()
			return "job-" + r.Key + "-" + r.Format, nil
		},
		imp: func(ctx context.Context, r events.ImportRequest) (events.ImportReply, error) {
			imports.Add(1)
			if ctx.Value(key{}) != "imports" {
				return events.ImportReply{}, errors.New("import runs under the request's context, not ImportContext")
			}
			return events.ImportReply{ImportID: "i1", Bucket: "uploads", Key: "imports/" + r.Key, Size: -1}, nil
		},
		reconcile: func(_ context.Context, r events.ReconcileRequest) (events.ReconcileResult, error) {
			return events.ReconcileResult{Listed: 3, Queued: 1, Keys: []string{r.Prefix + "a"}}, nil
		},
	}
	serveIntake(t, s.url, in, importCtx)
	serveIntake(t, s.url, in, importCtx)
	client := control.NewClient(s.nc, 30*time.Second)
	ctx := context.Background()

	rc, err := client.Reconvert(ctx, events.ReconvertRequest{Bucket: "uploads", Key: "a.vhdx", Format: "qcow2"})
	if err != nil || rc.JobID != "job-a.vhdx-qcow2" {
		t.Fatalf("reconvert = %+v, %v", rc, err)
	}
	im, err := client.Import(ctx, events.ImportRequest{URL: "https://example.com/d.qcow2", Key: "d.qcow2"})
	if err != nil || im.ImportID != "i1" || im.Key != "imports/d.qcow2" || im.Size != -1 {
		t.Fatalf("import = %+v, %v", im, err)
	}
	rr, err := client.Reconcile(ctx, events.ReconcileRequest{Prefix: "disks/"})
	if err != nil || rr.Listed != 3 || rr.Queued != 1 || len(rr.Keys) != 1 || rr.Keys[0] != "disks/a" {
		t.Fatalf("reconcile = %+v, %v", rr, err)
	}
	if reconverts.Load() != 1 || imports.Load() != 1 {
		t.Errorf("two replicas ran %d reconverts and %d imports for one request each", reconverts.Load(), imports.Load())
	}
	mu.Lock()
	defer mu.Unlock()
	if len(deadlines) != 1 || !deadlines[0] {
		t.Errorf("a reconvert ran without a deadline: %v", deadlines)
	}
}

func TestIntakeClientSaysWhenNoIngestReplicaAnswers(t *testing.T) {
	s := startNATS(t)
	ctx, cancel := context.WithCancel(context.Background())
	in := &fakeIntake{reconcile: func(context.Context, events.ReconcileRequest) (events.ReconcileResult, error) {
		return events.ReconcileResult{}, nil
	}}
	err := control.ServeIntake(ctx, connect(t, s.url), control.IntakeOptions{Intake: in, IsRequestError: isRefusal})
	if err != nil {
		t.Fatal(err)
	}
	// The service stops with its context, as at a drain.
	cancel()
	client := control.NewClient(s.nc, 30*time.Second)
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err = client.Reconcile(context.Background(), events.ReconcileRequest{})
		if err != nil && strings.Contains(err.Error(), "no ingest replica answers on "+events.SubjectReconcile) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the service stopped, reconcile = %v; want no ingest replica answers", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestReplicaRefusesAnUndecodableVerbNamingItself(t *testing.T) {
	s := startNATS(t)
	svc := replica(t, s.url, "convert", &fakeWorker{})
	msg := rawRequest(t, s.nc, events.ReplicaSubject("convert", events.VerbCancel), `{"bucket":"uploads"}`)
	var who events.Replica
	if err := json.Unmarshal(msg.Data, &who); err != nil || who.Instance != svc.ID() || who.Function != "convert" {
		t.Errorf("refusal body %q does not name the replica %s: %v", msg.Data, svc.ID(), err)
	}
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != events.CodeBadRequest || msg.Header.Get(micro.ErrorHeader) != "cancel needs bucket and key" {
		t.Errorf("refusal headers = %v, want 400 and why", msg.Header)
	}
	msg = rawRequest(t, s.nc, events.ReplicaSubject("convert", events.VerbStatus), `not json`)
	if code := msg.Header.Get(micro.ErrorCodeHeader); code != events.CodeBadRequest || !strings.Contains(msg.Header.Get(micro.ErrorHeader), "not valid JSON") {
		t.Errorf("an undecodable request answered %v %q", msg.Header, msg.Data)
	}
}
