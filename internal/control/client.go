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
}

// NewClient returns a client; timeout <= 0 means DefaultTimeout.
func NewClient(nc *nats.Conn, timeout time.Duration) *Client {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &Client{nc: nc, timeout: timeout}
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

// Gather sends verb to every replica of the given functions and returns
// every answer that arrives within the timeout. There is no way to know
// how many replicas exist short of asking, so it waits for the whole
// timeout, unless req names one instance, whose single answer ends it.
func (c *Client) Gather(ctx context.Context, functions []string, verb string, req Request) ([]Reply, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	inbox := c.nc.NewInbox()
	sub, err := c.nc.SubscribeSync(inbox)
	if err != nil {
		return nil, fmt.Errorf("control: %w", err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	for _, fn := range functions {
		if err := c.nc.PublishMsg(&nats.Msg{Subject: Subject(fn, verb), Reply: inbox, Data: body}); err != nil {
			return nil, fmt.Errorf("control: send %s to %s: %w", verb, fn, err)
		}
	}
	if err := c.nc.Flush(); err != nil {
		return nil, fmt.Errorf("control: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	var out []Reply
	for {
		msg, err := sub.NextMsgWithContext(ctx)
		// The server answers "no responders" for a function with no
		// replica; others may still answer.
		if errors.Is(err, nats.ErrNoResponders) {
			continue
		}
		if err != nil {
			break
		}
		r := Reply{Data: msg.Data}
		if e := msg.Header.Get(micro.ErrorHeader); e != "" {
			r.Err = e
		}
		out = append(out, r)
		if req.Instance != "" {
			break
		}
	}
	if len(out) == 0 {
		if req.Instance != "" {
			return nil, fmt.Errorf("no replica with instance id %q answered", req.Instance)
		}
		return nil, ErrNoReplica
	}
	return out, nil
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
