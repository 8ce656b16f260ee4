package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/natsrt"
)

// DefaultTimeout is how long a client gathers answers. Replicas answer in
// milliseconds; the margin is for a replica across a slow link.
const DefaultTimeout = time.Second

// ErrNoReplica means no replica answered within the timeout.
var ErrNoReplica = errors.New("no imagepipe replica answered (is any running, on this NATS?)")

// Client asks the fleet: it scatters a replica verb to every replica and
// gathers the answers, and sends ingest's requests to the one ingest
// replica that takes each.
type Client struct {
	nc      *nats.Conn
	timeout time.Duration
	// findWithin is how long a request for one instance looks for it.
	findWithin time.Duration
}

// NewClient returns a client that gathers answers, or waits for ingest's
// one answer, for timeout; timeout <= 0 means DefaultTimeout. A request
// for one instance looks for it for natsrt.DefaultConnectTimeout unless
// FindWithin says otherwise.
func NewClient(nc *nats.Conn, timeout time.Duration) *Client {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &Client{nc: nc, timeout: timeout, findWithin: natsrt.DefaultConnectTimeout}
}

// FindWithin sets how long a request for one instance keeps looking for
// it before it reports that no such replica answered; d <= 0 keeps the
// default. A named replica is known to exist, so its silence for one
// round means a slow machine or a service still starting far more often
// than a replica that is gone: the wait belongs with the connect timeout,
// which allows for the same slowness.
func (c *Client) FindWithin(d time.Duration) *Client {
	if d > 0 {
		c.findWithin = d
	}
	return c
}

// NoInstanceError is a request for one instance that no replica of that
// id answered before the deadline. Seen are the replicas that did answer,
// so a mistyped or stale id can be told from a fleet that is silent.
type NoInstanceError struct {
	Instance string
	Within   time.Duration
	Seen     []events.Replica
}

// maxListed bounds how many replicas an error names; the count is exact.
const maxListed = 10

func (e *NoInstanceError) Error() string {
	msg := fmt.Sprintf("no replica with instance id %q answered within %s (IMAGEPIPE_CONNECT_TIMEOUT)", e.Instance, e.Within)
	if len(e.Seen) == 0 {
		return msg + "; no replica answered at all: is any running, on this NATS?"
	}
	var names []string
	for i, r := range e.Seen {
		if i == maxListed {
			names = append(names, "...")
			break
		}
		names = append(names, r.Function+" "+r.Instance)
	}
	noun := "replicas"
	if len(e.Seen) == 1 {
		noun = "replica"
	}
	return fmt.Sprintf("%s; %d %s answered: %s", msg, len(e.Seen), noun, strings.Join(names, ", "))
}

// gather sends verb to every replica of the given functions and returns
// every answer that arrives within the timeout. There is no way to know
// how many replicas exist short of asking, so it waits for the whole
// timeout, unless req names one instance: then it finds that replica
// first and returns its single answer.
func (c *Client) gather(ctx context.Context, functions []string, verb string, req events.ControlRequest) ([]*nats.Msg, error) {
	if req.Instance != "" {
		return c.gatherOne(ctx, functions, verb, req)
	}
	sent, err := c.scatter(functions, verb, req)
	if err != nil {
		return nil, err
	}
	defer sent.close()
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	var out []*nats.Msg
	for {
		msg, err := sent.next(ctx)
		if err != nil {
			break
		}
		out = append(out, msg)
	}
	if len(out) == 0 {
		return nil, ErrNoReplica
	}
	return out, nil
}

// gatherOne finds the replica req names, then sends it verb once. Finding
// asks for status, which changes nothing, so it can be asked again and
// again; the verb itself (a drain, a stop) goes out once, to the found
// replica's function only.
func (c *Client) gatherOne(ctx context.Context, functions []string, verb string, req events.ControlRequest) ([]*nats.Msg, error) {
	started := time.Now()
	found, who, err := c.find(ctx, functions, req.Instance)
	if err != nil {
		return nil, err
	}
	if verb == events.VerbStatus {
		return []*nats.Msg{found}, nil
	}
	// The replica has just answered, so it is there; what is left of the
	// deadline, and never less than one round, is for its answer.
	wait := max(c.findWithin-time.Since(started), c.timeout)
	r, err := c.askOne(ctx, who, verb, req, wait)
	if err != nil {
		return nil, err
	}
	return []*nats.Msg{r}, nil
}

// find asks every replica of functions for its status, round after round,
// until the one with id instance answers or findWithin has passed. Every
// round shares one inbox, so an answer that arrives after its round ended
// still counts; a new round is for a request that was lost, such as one
// sent before the replica's service was listening.
func (c *Client) find(ctx context.Context, functions []string, instance string) (*nats.Msg, events.Replica, error) {
	fctx, cancel := context.WithTimeout(ctx, c.findWithin)
	defer cancel()
	sent, err := c.scatter(functions, events.VerbStatus, events.ControlRequest{})
	if err != nil {
		return nil, events.Replica{}, err
	}
	defer sent.close()
	seen := map[string]events.Replica{}
	for {
		if r, who, ok := c.round(fctx, sent, instance, seen); ok {
			return r, who, nil
		}
		if fctx.Err() != nil {
			break
		}
		if err := sent.again(); err != nil {
			return nil, events.Replica{}, err
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, events.Replica{}, fmt.Errorf("control: looking for instance %q: %w", instance, err)
	}
	nie := &NoInstanceError{Instance: instance, Within: c.findWithin}
	for _, r := range seen {
		nie.Seen = append(nie.Seen, r)
	}
	sortReplicas(nie.Seen, func(r events.Replica) events.Replica { return r })
	return nil, events.Replica{}, nie
}

// round reads answers for one timeout, noting each replica in seen, and
// stops early at the answer of instance.
func (c *Client) round(ctx context.Context, sent *scattered, instance string, seen map[string]events.Replica) (*nats.Msg, events.Replica, bool) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	for {
		msg, err := sent.next(ctx)
		if err != nil {
			return nil, events.Replica{}, false
		}
		var who events.Replica
		if json.Unmarshal(msg.Data, &who) != nil || who.Instance == "" {
			continue
		}
		if who.Instance == instance {
			return msg, who, true
		}
		seen[who.Instance] = who
	}
}

// askOne sends verb to one replica and waits up to wait for its answer.
func (c *Client) askOne(ctx context.Context, who events.Replica, verb string, req events.ControlRequest, wait time.Duration) (*nats.Msg, error) {
	sent, err := c.scatter([]string{who.Function}, verb, req)
	if err != nil {
		return nil, err
	}
	defer sent.close()
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	msg, err := sent.next(ctx)
	if err != nil {
		return nil, fmt.Errorf("%s replica %q answered status but not %s within %s (did it just exit?): %w",
			who.Function, who.Instance, verb, wait.Round(time.Millisecond), err)
	}
	return msg, nil
}

// scattered is a verb sent to every replica of some functions, and the
// inbox where their answers arrive.
type scattered struct {
	nc        *nats.Conn
	sub       *nats.Subscription
	functions []string
	verb      string
	body      []byte
}

// scatter sends verb to every replica of functions; close the result
// once the answers are read.
func (c *Client) scatter(functions []string, verb string, req events.ControlRequest) (*scattered, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	sub, err := c.nc.SubscribeSync(c.nc.NewInbox())
	if err != nil {
		return nil, fmt.Errorf("control: %w", err)
	}
	s := &scattered{nc: c.nc, sub: sub, functions: functions, verb: verb, body: body}
	if err := s.again(); err != nil {
		s.close()
		return nil, err
	}
	return s, nil
}

// again sends the verb once more, its answers to the same inbox.
func (s *scattered) again() error {
	for _, fn := range s.functions {
		if err := s.nc.PublishMsg(&nats.Msg{Subject: events.ReplicaSubject(fn, s.verb), Reply: s.sub.Subject, Data: s.body}); err != nil {
			return fmt.Errorf("control: send %s to %s: %w", s.verb, fn, err)
		}
	}
	if err := s.nc.Flush(); err != nil {
		return fmt.Errorf("control: %w", err)
	}
	return nil
}

// next is the next answer. The server answers "no responders" for a
// function with no replica; others may still answer, so that is skipped.
func (s *scattered) next(ctx context.Context) (*nats.Msg, error) {
	for {
		msg, err := s.sub.NextMsgWithContext(ctx)
		if errors.Is(err, nats.ErrNoResponders) {
			continue
		}
		return msg, err
	}
}

func (s *scattered) close() { _ = s.sub.Unsubscribe() }

// gatherAs gathers and decodes the answers. Replicas that answered with an
// error come back as ReplyErrors joined into err, beside the good answers.
func gatherAs[T any](ctx context.Context, c *Client, functions []string, verb string, req events.ControlRequest) ([]T, error) {
	msgs, err := c.gather(ctx, functions, verb, req)
	if err != nil {
		return nil, err
	}
	var out []T
	var errs []error
	for _, msg := range msgs {
		v, err := decodeAnswer[T](msg)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, v)
	}
	return out, errors.Join(errs...)
}

// Status asks every replica of functions for its status.
func (c *Client) Status(ctx context.Context, functions []string, instance string) ([]events.ReplicaStatus, error) {
	out, err := gatherAs[events.ReplicaStatus](ctx, c, functions, events.VerbStatus, events.ControlRequest{Instance: instance})
	sortReplicas(out, func(s events.ReplicaStatus) events.Replica { return s.Replica })
	return out, err
}

// Stats asks every replica of functions for its statistics.
func (c *Client) Stats(ctx context.Context, functions []string, instance string) ([]events.ReplicaStats, error) {
	out, err := gatherAs[events.ReplicaStats](ctx, c, functions, events.VerbStats, events.ControlRequest{Instance: instance})
	sortReplicas(out, func(s events.ReplicaStats) events.Replica { return s.Replica })
	return out, err
}

// Steer sends pause, resume, drain or stop and returns the states the
// replicas report after it.
func (c *Client) Steer(ctx context.Context, functions []string, verb, instance string) ([]events.ReplicaStatus, error) {
	switch verb {
	case events.VerbPause, events.VerbResume, events.VerbDrain, events.VerbStop:
	default:
		return nil, fmt.Errorf("control: %q is not pause, resume, drain or stop", verb)
	}
	out, err := gatherAs[events.ReplicaStatus](ctx, c, functions, verb, events.ControlRequest{Instance: instance})
	sortReplicas(out, func(s events.ReplicaStatus) events.Replica { return s.Replica })
	return out, err
}

func sortReplicas[T any](s []T, id func(T) events.Replica) {
	order := func(fn string) int {
		if i := slices.Index(events.Functions(), fn); i >= 0 {
			return i
		}
		return len(events.Functions())
	}
	slices.SortFunc(s, func(a, b T) int {
		ra, rb := id(a), id(b)
		if d := order(ra.Function) - order(rb.Function); d != 0 {
			return d
		}
		if d := strings.Compare(ra.Function, rb.Function); d != 0 {
			return d
		}
		if d := strings.Compare(ra.Host, rb.Host); d != 0 {
			return d
		}
		return strings.Compare(ra.Instance, rb.Instance)
	})
}

// Reconvert asks an ingest replica to queue a new conversion of an upload.
func (c *Client) Reconvert(ctx context.Context, req events.ReconvertRequest) (events.ReconvertReply, error) {
	return call[events.ReconvertReply](ctx, c, events.SubjectReconvert, req)
}

// Import asks an ingest replica to fetch a URL into the input bucket; it
// answers once the transfer has started.
func (c *Client) Import(ctx context.Context, req events.ImportRequest) (events.ImportReply, error) {
	return call[events.ImportReply](ctx, c, events.SubjectImport, req)
}

// Reconcile asks an ingest replica for one reconcile pass and waits for
// what it did.
func (c *Client) Reconcile(ctx context.Context, req events.ReconcileRequest) (events.ReconcileResult, error) {
	return call[events.ReconcileResult](ctx, c, events.SubjectReconcile, req)
}

// call sends req to the one ingest replica its queue group picks, waits
// up to the client's timeout for the answer, and decodes it; a refusal
// comes back as a *ReplyError saying why in one line.
func call[Rep any](ctx context.Context, c *Client, subject string, req any) (Rep, error) {
	var none Rep
	body, err := json.Marshal(req)
	if err != nil {
		return none, err
	}
	rctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	msg, err := c.nc.RequestWithContext(rctx, subject, body)
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		return none, fmt.Errorf("no ingest replica answers on %s: is imagepipe ingest (or imagepipe dev) running?", subject)
	case errors.Is(err, context.DeadlineExceeded):
		return none, fmt.Errorf("no answer on %s within %s", subject, c.timeout)
	case err != nil:
		return none, fmt.Errorf("request on %s: %w", subject, err)
	}
	return decodeAnswer[Rep](msg)
}
