package control

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"maps"
	"os"
	"regexp"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/natsrt"
)

// Worker is the part of a runtime worker the replica verbs steer.
type Worker interface {
	Pause()
	Resume()
	Drain()
	Stop()
	State() events.WorkerState
	InFlight() int64
	Jobs() []events.JobInfo
	Cancel(bucket, key string) []events.JobInfo
	Counts() events.WorkerCounts
	Started() time.Time
	Consumer(ctx context.Context) (*jetstream.ConsumerInfo, error)
}

var _ Worker = (*natsrt.Worker)(nil)

// Options describe the replica a service speaks for.
type Options struct {
	Function string
	// Version must be semver for micro; anything else is reported as
	// 0.0.0 with the original in the service metadata.
	Version string
	// Config is a summary of the replica's settings for status. The
	// caller leaves secrets out: everything here is shown to anyone who
	// may send a control request.
	Config map[string]string
	Worker Worker
	Log    *slog.Logger
}

// Service answers the replica verbs for one replica.
type Service struct {
	srv     *server
	opts    Options
	replica events.Replica
	created time.Time
}

// verbTimeout bounds one verb's handling; only stats makes a round trip.
const verbTimeout = 5 * time.Second

// Start registers the replica's micro service. It answers until Stop or
// until nc closes.
func Start(nc *nats.Conn, o Options) (*Service, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	host, _ := os.Hostname()
	s := &Service{opts: o, created: time.Now()}
	svc, err := listen(nc, micro.Config{
		Name:        events.ServiceName(o.Function),
		Version:     semver(o.Version),
		Description: "imagepipe " + o.Function + " function",
		Metadata: map[string]string{
			"function": o.Function,
			"host":     host,
			"pid":      strconv.Itoa(os.Getpid()),
			"version":  o.Version,
		},
		// micro calls this once per endpoint under its own lock: only
		// what the worker holds in memory, never a round trip.
		StatsHandler: func(*micro.Endpoint) any { return s.local() },
	}, o.Log)
	if err != nil {
		return nil, err
	}
	s.replica = events.Replica{Function: o.Function, Instance: svc.Info().ID, Host: host, PID: os.Getpid(), Version: o.Version}
	s.srv = &server{
		svc: svc, log: o.Log, ctx: context.Background(), timeout: verbTimeout,
		// A refusal names the replica, so that a client gathering from
		// many can say which one refused.
		errorBody: func(string) []byte { b, _ := json.Marshal(s.replica); return b },
	}
	err = errors.Join(
		addVerb(s, events.VerbStatus, s.status),
		addVerb(s, events.VerbStats, s.stats),
		addVerb(s, events.VerbPause, s.steer("pause", o.Worker.Pause)),
		addVerb(s, events.VerbResume, s.steer("resume", o.Worker.Resume)),
		addVerb(s, events.VerbDrain, s.steer("drain", o.Worker.Drain)),
		addVerb(s, events.VerbStop, s.steer("stop", o.Worker.Stop)),
		addVerb(s, events.VerbCancel, s.cancel),
	)
	// Once Start returns, the replica answers.
	if err := s.srv.ready(nc, err); err != nil {
		return nil, err
	}
	return s, nil
}

// addVerb registers verb on the replica's own subject, with no queue
// group (every replica answers for itself), and keeps quiet when the
// request names another instance.
func addVerb[Rep any](s *Service, verb string, h func(context.Context, events.ControlRequest) (Rep, error)) error {
	mine := func(ctx context.Context, req events.ControlRequest) (Rep, error) {
		if req.Instance != "" && req.Instance != s.replica.Instance {
			var none Rep
			return none, errNotForMe
		}
		return h(ctx, req)
	}
	return addEndpoint(s.srv, verb, events.ReplicaSubject(s.opts.Function, verb), mine, micro.WithEndpointQueueGroupDisabled())
}

// ID is the replica's instance id, the one `ctl --instance` takes.
func (s *Service) ID() string { return s.replica.Instance }

// Stop unregisters the service.
func (s *Service) Stop() error { return s.srv.svc.Stop() }

// Status is the replica's state now.
func (s *Service) Status() events.ReplicaStatus {
	w := s.opts.Worker
	return events.ReplicaStatus{
		Replica:       s.replica,
		State:         w.State(),
		InFlight:      w.InFlight(),
		Jobs:          w.Jobs(),
		Started:       s.started(),
		UptimeSeconds: s.uptime().Seconds(),
		Config:        maps.Clone(s.opts.Config),
	}
}

// Stats is what the replica has done and the queue in front of it.
func (s *Service) Stats(ctx context.Context) events.ReplicaStats {
	st := s.local()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if info, err := s.opts.Worker.Consumer(ctx); err != nil {
		st.QueueError = err.Error()
	} else {
		st.QueuePending, st.QueueAckPending = info.NumPending, uint64(info.NumAckPending)
	}
	return st
}

// local is Stats without the queue: the replica's Status and what it has
// done.
func (s *Service) local() events.ReplicaStats {
	now := s.Status()
	return events.ReplicaStats{Replica: now.Replica, State: now.State, InFlight: now.InFlight,
		UptimeSeconds: now.UptimeSeconds, Counts: s.opts.Worker.Counts()}
}

func (s *Service) started() time.Time {
	if t := s.opts.Worker.Started(); !t.IsZero() {
		return t
	}
	return s.created
}

func (s *Service) uptime() time.Duration { return time.Since(s.started()).Round(time.Second) }

func (s *Service) status(context.Context, events.ControlRequest) (events.ReplicaStatus, error) {
	return s.Status(), nil
}

func (s *Service) stats(ctx context.Context, _ events.ControlRequest) (events.ReplicaStats, error) {
	return s.Stats(ctx), nil
}

// steer runs an operator's command and answers with the resulting state.
func (s *Service) steer(what string, do func()) func(context.Context, events.ControlRequest) (events.ReplicaStatus, error) {
	return func(context.Context, events.ControlRequest) (events.ReplicaStatus, error) {
		s.opts.Log.Info("operator request", "control", what)
		do()
		return s.Status(), nil
	}
}

func (s *Service) cancel(_ context.Context, req events.ControlRequest) (events.CancelReply, error) {
	if req.Bucket == "" || req.Key == "" {
		return events.CancelReply{}, badRequest(errors.New("cancel needs bucket and key"))
	}
	jobs := s.opts.Worker.Cancel(req.Bucket, req.Key)
	if len(jobs) > 0 {
		s.opts.Log.Info("operator request", "control", "cancel", "bucket", req.Bucket, "key", req.Key, "jobs", len(jobs))
	}
	return events.CancelReply{Replica: s.replica, Cancelled: jobs}, nil
}

var semverRE = regexp.MustCompile(`^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$`)

// semver returns v when micro will take it; a build stamped with something
// else (a commit id, "v1.2.3") still registers.
func semver(v string) string {
	if semverRE.MatchString(v) {
		return v
	}
	if len(v) > 1 && v[0] == 'v' && semverRE.MatchString(v[1:]) {
		return v[1:]
	}
	return "0.0.0"
}
