package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/imagepipe/imagepipe/events"
)

// Every request of the control plane, a replica's verb or one of ingest's
// requests, is answered the way nats.go's micro answers: a JSON request
// in, a JSON answer out, or a failure as micro's error headers (code and
// description, as Request.Error takes them) with a body the service
// chooses. This file is that exchange, both ends, written once.

// errNotForMe leaves a request unanswered: it names another replica, and
// a client gathering answers must not count this one's.
var errNotForMe = errors.New("the request is for another replica")

// badRequestError is a request that cannot succeed as asked.
type badRequestError struct{ err error }

func (e *badRequestError) Error() string { return e.err.Error() }
func (e *badRequestError) Unwrap() error { return e.err }

// badRequest marks err as the asker's to fix: it is answered with code
// 400 and not logged.
func badRequest(err error) error { return &badRequestError{err} }

// server is a micro service whose endpoints answer as above.
type server struct {
	svc micro.Service
	log *slog.Logger
	// ctx and timeout bound the handling of each request; timeout 0 is
	// no bound beyond ctx.
	ctx     context.Context
	timeout time.Duration
	// isBadRequest tells, beside badRequest, which handler errors are
	// the asker's to fix.
	isBadRequest func(error) bool
	// errorBody is the body of a failed answer.
	errorBody func(description string) []byte
}

// listen registers cfg's service, logging the errors micro reports.
func listen(nc *nats.Conn, cfg micro.Config, log *slog.Logger) (micro.Service, error) {
	cfg.ErrorHandler = func(_ micro.Service, err *micro.NATSError) {
		log.Warn("control service error", "service", cfg.Name, "subject", err.Subject, "err", err.Description)
	}
	svc, err := micro.AddService(nc, cfg)
	if err != nil {
		return nil, fmt.Errorf("register control service %s: %w", cfg.Name, err)
	}
	return svc, nil
}

// ready returns once the service answers: its endpoints added (err says
// how that went) and their subscriptions known to the server. On a
// failure it stops the service.
func (s *server) ready(nc *nats.Conn, err error) error {
	if err == nil {
		err = nc.Flush()
	}
	if err != nil {
		_ = s.svc.Stop()
		return fmt.Errorf("register control service %s: %w", s.svc.Info().Name, err)
	}
	return nil
}

// addEndpoint registers h on subject: the request decoded into Req (an
// empty body is the zero Req), the answer Rep as JSON.
func addEndpoint[Req, Rep any](s *server, name, subject string, h func(context.Context, Req) (Rep, error), opts ...micro.EndpointOpt) error {
	handler := micro.HandlerFunc(func(r micro.Request) { serve(s, r, h) })
	opts = append([]micro.EndpointOpt{micro.WithEndpointSubject(subject)}, opts...)
	if err := s.svc.AddEndpoint(name, handler, opts...); err != nil {
		return fmt.Errorf("register control endpoint %s: %w", name, err)
	}
	return nil
}

func serve[Req, Rep any](s *server, r micro.Request, h func(context.Context, Req) (Rep, error)) {
	var req Req
	if err := decodeRequest(r.Data(), &req); err != nil {
		s.fail(r, err)
		return
	}
	ctx, cancel := s.ctx, context.CancelFunc(func() {})
	if s.timeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, s.timeout)
	}
	defer cancel()
	rep, err := h(ctx, req)
	switch {
	case errors.Is(err, errNotForMe):
		return
	case err != nil:
		s.fail(r, err)
		return
	}
	if err := r.RespondJSON(rep); err != nil {
		s.log.Warn("control reply not sent", "subject", r.Subject(), "err", err)
	}
}

func decodeRequest(data []byte, v any) error {
	if len(data) == 0 {
		return nil
	}
	if err := json.Unmarshal(data, v); err != nil {
		return badRequest(fmt.Errorf("the request is not valid JSON: %v", err))
	}
	return nil
}

// fail answers err with micro's error headers and the service's body.
func (s *server) fail(r micro.Request, err error) {
	code := events.CodeFailed
	var bad *badRequestError
	if errors.As(err, &bad) || (s.isBadRequest != nil && s.isBadRequest(err)) {
		code = events.CodeBadRequest
	} else {
		s.log.Warn("control request failed", "subject", r.Subject(), "err", err)
	}
	if rerr := r.Error(code, err.Error(), s.errorBody(err.Error())); rerr != nil {
		s.log.Warn("control reply not sent", "subject", r.Subject(), "err", rerr)
	}
}

// ReplyError is an answer that carries a failure: the replica that
// refused, when it says, and why.
type ReplyError struct {
	events.Replica
	Message string
}

func (e *ReplyError) Error() string {
	if e.Function == "" {
		return e.Message
	}
	return fmt.Sprintf("%s %s: %s", e.Function, e.Instance, e.Message)
}

// decodeAnswer is the other end of serve: msg's body as T, or the failure
// it carries as a *ReplyError. A body of {"error": ...} is a failure even
// without micro's headers, as a plain responder would send it.
func decodeAnswer[T any](msg *nats.Msg) (T, error) {
	var zero T
	var refused events.ErrorReply
	if json.Unmarshal(msg.Data, &refused) == nil && refused.Error != "" {
		return zero, &ReplyError{Message: refused.Error}
	}
	if desc := msg.Header.Get(micro.ErrorHeader); desc != "" {
		re := &ReplyError{Message: desc}
		_ = json.Unmarshal(msg.Data, &re.Replica)
		return zero, re
	}
	var v T
	if err := json.Unmarshal(msg.Data, &v); err != nil {
		return zero, fmt.Errorf("control: undecodable answer: %w", err)
	}
	return v, nil
}
