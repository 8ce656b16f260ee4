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
	"github.com/nats-io/nats.go/micro"

	"github.com/imagepipe/imagepipe/internal/natsrt"
)

// DefaultTimeout is how long a client gathers answers. Replicas answer in
// milliseconds; the margin is for a replica across a slow link.
const DefaultTimeout = time.Second

// ErrNoReplica means no replica answered within the timeout.
var ErrNoReplica = errors.New("no imagepipe replica answered (is any running, on this NATS?)")

// Client scatters control requests to every replica and gathers the
// answers.
type Client struct {
	nc      *nats.Conn
	timeout time.Duration
	// findWithin is how long a request for one instance looks for it.
	findWithin time.Duration
}

// NewClient returns a client; timeout <= 0 means DefaultTimeout. A request
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

// Reply is one replica's answer.
type Reply struct {
	Data []byte
	// Err is the replica's error description, when it answered with one.
	Err string
}

// ReplyError is a replica that answered with an error.
type ReplyError struct {
	Replica
	Message string
}

func (e *ReplyError) Error() string {
	return fmt.Sprintf("%s %s: %s", e.Function, e.Instance, e.Message)
}

// NoInstanceError is a request for one instance that no replica of that
// id answered before the deadline. Seen are the replicas that did answer,
// so a mistyped or stale id can be told from a fleet that is silent.
type NoInstanceError struct {
	Instance string
	Within   time.Duration
	Seen     []Replica
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

// Gather sends verb to every replica of the given functions and returns
// every answer that arrives within the timeout. There is no way to know
// how many replicas exist short of asking, so it waits for the whole
// timeout, unless req names one instance: then it finds that replica
// first and returns its single answer.
func (c *Client) Gather(ctx context.Context, functions []string, verb string, req Request) ([]Reply, error) {
	if req.Instance != "" {
		return c.gatherOne(ctx, functions, verb, req)
	}
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	sub, inbox, err := c.inbox()
	if err != nil {
		return nil, err
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := c.scatter(inbox, functions, verb, body); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	var out []Reply
	for {
		msg, err := next(ctx, sub)
		if err != nil {
			break
		}
		out = append(out, reply(msg))
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
func (c *Client) gatherOne(ctx context.Context, functions []string, verb string, req Request) ([]Reply, error) {
	started := time.Now()
	found, who, err := c.find(ctx, functions, req.Instance)
	if err != nil {
		return nil, err
	}
	if verb == VerbStatus {
		return []Reply{found}, nil
	}
	// The replica has just answered, so it is there; what is left of the
	// deadline, and never less than one round, is for its answer.
	wait := max(c.findWithin-time.Since(started), c.timeout)
	r, err := c.askOne(ctx, who, verb, req, wait)
	if err != nil {
		return nil, err
	}
	return []Reply{r}, nil
}

// find asks every replica of functions for its status, round after round,
// until the one with id instance answers or findWithin has passed. Every
// round shares one inbox, so an answer that arrives after its round ended
// still counts; a new round is for a request that was lost, such as one
// sent before the replica's service was listening.
func (c *Client) find(ctx context.Context, functions []string, instance string) (Reply, Replica, error) {
	body, err := json.Marshal(Request{})
	if err != nil {
		return Reply{}, Replica{}, err
	}
	sub, inbox, err := c.inbox()
	if err != nil {
		return Reply{}, Replica{}, err
	}
	defer func() { _ = sub.Unsubscribe() }()
	fctx, cancel := context.WithTimeout(ctx, c.findWithin)
	defer cancel()
	seen := map[string]Replica{}
	for fctx.Err() == nil {
		if err := c.scatter(inbox, functions, VerbStatus, body); err != nil {
			return Reply{}, Replica{}, err
		}
		if r, who, ok := c.round(fctx, sub, instance, seen); ok {
			return r, who, nil
		}
	}
	if err := ctx.Err(); err != nil {
		return Reply{}, Replica{}, fmt.Errorf("control: looking for instance %q: %w", instance, err)
	}
	nie := &NoInstanceError{Instance: instance, Within: c.findWithin}
	for _, r := range seen {
		nie.Seen = append(nie.Seen, r)
	}
	sortReplicas(nie.Seen, func(r Replica) Replica { return r })
	return Reply{}, Replica{}, nie
}

// round reads answers for one timeout, noting each replica in seen, and
// stops early at the answer of instance.
func (c *Client) round(ctx context.Context, sub *nats.Subscription, instance string, seen map[string]Replica) (Reply, Replica, bool) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	for {
		msg, err := next(ctx, sub)
		if err != nil {
			return Reply{}, Replica{}, false
		}
		var who Replica
		if json.Unmarshal(msg.Data, &who) != nil || who.Instance == "" {
			continue
		}
		if who.Instance == instance {
			return reply(msg), who, true
		}
		seen[who.Instance] = who
	}
}

// askOne sends verb to one replica and waits up to wait for its answer.
func (c *Client) askOne(ctx context.Context, who Replica, verb string, req Request, wait time.Duration) (Reply, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return Reply{}, err
	}
	sub, inbox, err := c.inbox()
	if err != nil {
		return Reply{}, err
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := c.scatter(inbox, []string{who.Function}, verb, body); err != nil {
		return Reply{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	msg, err := next(ctx, sub)
	if err != nil {
		return Reply{}, fmt.Errorf("%s replica %q answered status but not %s within %s (did it just exit?): %w",
			who.Function, who.Instance, verb, wait.Round(time.Millisecond), err)
	}
	return reply(msg), nil
}

func (c *Client) inbox() (*nats.Subscription, string, error) {
	inbox := c.nc.NewInbox()
	sub, err := c.nc.SubscribeSync(inbox)
	if err != nil {
		return nil, "", fmt.Errorf("control: %w", err)
	}
	return sub, inbox, nil
}

// scatter sends verb to every replica of functions, answers to inbox.
func (c *Client) scatter(inbox string, functions []string, verb string, body []byte) error {
	for _, fn := range functions {
		if err := c.nc.PublishMsg(&nats.Msg{Subject: Subject(fn, verb), Reply: inbox, Data: body}); err != nil {
			return fmt.Errorf("control: send %s to %s: %w", verb, fn, err)
		}
	}
	if err := c.nc.Flush(); err != nil {
		return fmt.Errorf("control: %w", err)
	}
	return nil
}

// next is the next answer. The server answers "no responders" for a
// function with no replica; others may still answer, so that is skipped.
func next(ctx context.Context, sub *nats.Subscription) (*nats.Msg, error) {
	for {
		msg, err := sub.NextMsgWithContext(ctx)
		if errors.Is(err, nats.ErrNoResponders) {
			continue
		}
		return msg, err
	}
}

func reply(msg *nats.Msg) Reply {
	r := Reply{Data: msg.Data}
	if e := msg.Header.Get(micro.ErrorHeader); e != "" {
		r.Err = e
	}
	return r
}

// gatherAs gathers and decodes the answers. Replicas that answered with an
// error come back as ReplyErrors joined into err, beside the good answers.
func gatherAs[T any](ctx context.Context, c *Client, functions []string, verb string, req Request) ([]T, error) {
	replies, err := c.Gather(ctx, functions, verb, req)
	if err != nil {
		return nil, err
	}
	var out []T
	var errs []error
	for _, r := range replies {
		if r.Err != "" {
			re := &ReplyError{Message: r.Err}
			_ = json.Unmarshal(r.Data, &re.Replica)
			errs = append(errs, re)
			continue
		}
		var v T
		if err := json.Unmarshal(r.Data, &v); err != nil {
			errs = append(errs, fmt.Errorf("control: undecodable answer: %w", err))
			continue
		}
		out = append(out, v)
	}
	return out, errors.Join(errs...)
}

// Status asks every replica of functions for its status.
func (c *Client) Status(ctx context.Context, functions []string, instance string) ([]Status, error) {
	out, err := gatherAs[Status](ctx, c, functions, VerbStatus, Request{Instance: instance})
	sortReplicas(out, func(s Status) Replica { return s.Replica })
	return out, err
}

// Stats asks every replica of functions for its statistics.
func (c *Client) Stats(ctx context.Context, functions []string, instance string) ([]ReplicaStats, error) {
	out, err := gatherAs[ReplicaStats](ctx, c, functions, VerbStats, Request{Instance: instance})
	sortReplicas(out, func(s ReplicaStats) Replica { return s.Replica })
	return out, err
}

// Steer sends pause, resume, drain or stop and returns the states the
// replicas report after it.
func (c *Client) Steer(ctx context.Context, functions []string, verb, instance string) ([]Status, error) {
	switch verb {
	case VerbPause, VerbResume, VerbDrain, VerbStop:
	default:
		return nil, fmt.Errorf("control: %q is not pause, resume, drain or stop", verb)
	}
	out, err := gatherAs[Status](ctx, c, functions, verb, Request{Instance: instance})
	sortReplicas(out, func(s Status) Replica { return s.Replica })
	return out, err
}

func sortReplicas[T any](s []T, id func(T) Replica) {
	order := func(fn string) int {
		if i := slices.Index(Functions, fn); i >= 0 {
			return i
		}
		return len(Functions)
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
