package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"regexp"
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/imagepipe/imagepipe/internal/natsrt"
)

// Worker is the part of a runtime worker the control API steers.
type Worker interface {
	Pause()
	Resume()
	Drain()
	Stop()
	State() natsrt.State
	InFlight() int64
	Jobs() []natsrt.JobInfo
	Cancel(bucket, key string) []natsrt.JobInfo
	Counts() natsrt.Counts
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

// Service answers control requests for one replica.
type Service struct {
	svc     micro.Service
	opts    Options
	replica Replica
	created time.Time
}

// Start registers the replica's micro service. It answers until Stop or
// until nc closes.
func Start(nc *nats.Conn, o Options) (*Service, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	host, _ := os.Hostname()
	version := semver(o.Version)
	s := &Service{opts: o, created: time.Now()}
	svc, err := micro.AddService(nc, micro.Config{
		Name:        ServiceName(o.Function),
		Version:     version,
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
		ErrorHandler: func(_ micro.Service, err *micro.NATSError) {
			o.Log.Warn("control service error", "subject", err.Subject, "err", err.Description)
		},
	})
	if err != nil {
		return nil, fmt.Errorf("register control service for %s: %w", o.Function, err)
	}
	s.svc = svc
	s.replica = Replica{Function: o.Function, Instance: svc.Info().ID, Host: host, PID: os.Getpid(), Version: o.Version}

	handlers := map[string]func(context.Context, Request) (any, error){
		VerbStatus: func(context.Context, Request) (any, error) { return s.Status(), nil },
		VerbStats:  func(ctx context.Context, _ Request) (any, error) { return s.Stats(ctx), nil },
		VerbPause:  s.steer("pause", o.Worker.Pause),
		VerbResume: s.steer("resume", o.Worker.Resume),
		VerbDrain:  s.steer("drain", o.Worker.Drain),
		VerbStop:   s.steer("stop", o.Worker.Stop),
		VerbCancel: s.cancel,
	}
	for _, verb := range Verbs {
		h := handlers[verb]
		err := svc.AddEndpoint(verb, micro.HandlerFunc(func(r micro.Request) { s.serve(r, h) }),
			micro.WithEndpointSubject(Subject(o.Function, verb)),
			micro.WithEndpointQueueGroupDisabled())
		if err != nil {
			_ = svc.Stop()
			return nil, fmt.Errorf("register control endpoint %s: %w", verb, err)
		}
	}
	// Once Start returns, the replica answers.
	if err := nc.Flush(); err != nil {
		_ = svc.Stop()
		return nil, fmt.Errorf("register control service for %s: %w", o.Function, err)
	}
	return s, nil
}

// ID is the replica's instance id, the one `ctl --instance` takes.
func (s *Service) ID() string { return s.replica.Instance }

// Stop unregisters the service.
func (s *Service) Stop() error { return s.svc.Stop() }

// Status is the replica's state now.
func (s *Service) Status() Status {
	w := s.opts.Worker
	return Status{
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
func (s *Service) Stats(ctx context.Context) ReplicaStats {
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

// local is Stats without the queue.
func (s *Service) local() ReplicaStats {
	w := s.opts.Worker
	return ReplicaStats{
		Replica:       s.replica,
		State:         w.State(),
		InFlight:      w.InFlight(),
		UptimeSeconds: s.uptime().Seconds(),
		Counts:        w.Counts(),
	}
}

func (s *Service) started() time.Time {
	if t := s.opts.Worker.Started(); !t.IsZero() {
		return t
	}
	return s.created
}

func (s *Service) uptime() time.Duration { return time.Since(s.started()).Round(time.Second) }

// steer runs an operator's command and answers with the resulting state.
func (s *Service) steer(what string, do func()) func(context.Context, Request) (any, error) {
	return func(context.Context, Request) (any, error) {
		s.opts.Log.Info("operator request", "control", what)
		do()
		return s.Status(), nil
	}
}

func (s *Service) cancel(_ context.Context, req Request) (any, error) {
	if req.Bucket == "" || req.Key == "" {
		return nil, errors.New("cancel needs bucket and key")
	}
	jobs := s.opts.Worker.Cancel(req.Bucket, req.Key)
	if len(jobs) > 0 {
		s.opts.Log.Info("operator request", "control", "cancel", "bucket", req.Bucket, "key", req.Key, "jobs", len(jobs))
	}
	return CancelReply{Replica: s.replica, Cancelled: jobs}, nil
}

// serve decodes a request, keeps quiet when it is meant for another
// replica, and answers with JSON or a micro error carrying the replica.
func (s *Service) serve(r micro.Request, h func(context.Context, Request) (any, error)) {
	var req Request
	if len(r.Data()) > 0 {
		if err := json.Unmarshal(r.Data(), &req); err != nil {
			s.respondError(r, "400", fmt.Sprintf("bad request: %v", err))
			return
		}
	}
	if req.Instance != "" && req.Instance != s.replica.Instance {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := h(ctx, req)
	if err != nil {
		s.respondError(r, "400", err.Error())
		return
	}
	if err := r.RespondJSON(out); err != nil {
		s.opts.Log.Warn("control reply failed", "err", err)
	}
}

func (s *Service) respondError(r micro.Request, code, desc string) {
	body, _ := json.Marshal(s.replica)
	if err := r.Error(code, desc, body); err != nil {
		s.opts.Log.Warn("control reply failed", "err", err)
	}
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
