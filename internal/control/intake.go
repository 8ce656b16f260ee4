package control

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"os"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/imagepipe/imagepipe/events"
)

// Intake is what ingest does on request, beside its consumer: queue a new
// conversion of an upload, fetch a URL into the input bucket, heal the
// uploads whose job was lost.
type Intake interface {
	Reconvert(ctx context.Context, req events.ReconvertRequest) (jobID string, err error)
	Import(ctx context.Context, req events.ImportRequest) (events.ImportReply, error)
	HandleReconcile(ctx context.Context, req events.ReconcileRequest) (events.ReconcileResult, error)
	// Stats are the intake's counters, published as the service's STATS.
	Stats() map[string]uint64
}

// IntakeOptions describe the ingest replica that serves the requests.
type IntakeOptions struct {
	Intake Intake
	// ImportContext is what an accepted import's transfer runs under: it
	// goes on after its reply, and after the service has stopped.
	ImportContext context.Context
	// IsRequestError tells the asker's mistakes, answered with code 400,
	// from failures of ours, answered with 500 and logged.
	IsRequestError func(error) bool
	// Version is the binary's, shown in the service's metadata.
	Version string
	Log     *slog.Logger
}

// intakeVersion is the version of the request API, not of the binary.
const intakeVersion = "1.0.0"

// reconvertTimeout bounds the reads and the publish a reconvert makes.
const reconvertTimeout = 30 * time.Second

// ServeIntake answers reconvert, import and reconcile requests until ctx
// ends. Its queue group is ingest's, so exactly one replica answers each
// request; micro adds discovery, PING and STATS, where the intake's
// counters are published. A request is handled under ctx, not one of its
// own: a reconcile is worth finishing though its asker gave up waiting.
func ServeIntake(ctx context.Context, nc *nats.Conn, o IntakeOptions) error {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.ImportContext == nil {
		o.ImportContext = ctx
	}
	host, _ := os.Hostname()
	svc, err := listen(nc, micro.Config{
		Name:         events.ServiceIntake,
		Version:      intakeVersion,
		Description:  "imagepipe ingest: re-convert, import and reconcile requests",
		Metadata:     map[string]string{"imagepipe_version": o.Version, "host": host},
		QueueGroup:   events.ServiceName(events.FunctionIngest),
		StatsHandler: func(*micro.Endpoint) any { return o.Intake.Stats() },
	}, o.Log)
	if err != nil {
		return err
	}
	srv := &server{
		svc: svc, log: o.Log, ctx: ctx, isBadRequest: o.IsRequestError,
		// A refusal's body says why, for a plain `nats req` to show.
		errorBody: func(desc string) []byte { b, _ := json.Marshal(events.ErrorReply{Error: desc}); return b },
	}
	in := intake{Intake: o.Intake, importCtx: o.ImportContext}
	err = errors.Join(
		addEndpoint(srv, "reconvert", events.SubjectReconvert, in.reconvert),
		addEndpoint(srv, "import", events.SubjectImport, in.importURL),
		addEndpoint(srv, "reconcile", events.SubjectReconcile, in.HandleReconcile),
	)
	// Once ServeIntake returns, the replica answers.
	if err := srv.ready(nc, err); err != nil {
		return err
	}
	go func() {
		<-ctx.Done()
		_ = svc.Stop()
	}()
	return nil
}

// intake adapts an Intake to the endpoints' handlers.
type intake struct {
	Intake
	importCtx context.Context
}

func (in intake) reconvert(ctx context.Context, req events.ReconvertRequest) (events.ReconvertReply, error) {
	ctx, cancel := context.WithTimeout(ctx, reconvertTimeout)
	defer cancel()
	id, err := in.Reconvert(ctx, req)
	return events.ReconvertReply{JobID: id}, err
}

// importURL answers once the transfer has started; the transfer goes on
// under importCtx.
func (in intake) importURL(_ context.Context, req events.ImportRequest) (events.ImportReply, error) {
	return in.Import(in.importCtx, req)
}
