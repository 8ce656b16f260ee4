// Package setup provisions what imagepipe needs before anything flows: the
// JetStream streams and status bucket, the S3 buckets with their lifecycle
// rule, and MinIO's bucket notification.
//
// There are two ways in. JetStream, ApplyKV and ObjectStore create or
// update everything and report each change; `imagepipe setup` and
// `imagepipe dev` use them. Streams, StatusKV, KV, Buckets and Notification
// only create what is missing and leave what exists alone; every function
// calls them at start, so that a function runs with credentials that may
// read but not change the streams, and a replica started with stale
// settings never undoes what the operator's last setup decided (say, scales
// a replicated stream down, or shortens a bucket's TTL). KV is the one way
// a function opens a key-value bucket of its own.
//
// The functions' calls make one attempt each: a function waits out a
// JetStream that cannot answer yet with natsrt.WaitJetStream around them,
// which also says in its log what it waits for. The setup calls wait
// themselves, for a while, since setup usually starts with its cluster.
package setup

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/natsrt"
)

// StreamConfig sizes the streams.
type StreamConfig struct {
	Replicas int `env:"IMAGEPIPE_STREAM_REPLICAS" envDefault:"1" doc:"JetStream replicas of every stream and bucket (3 in a cluster)"`
	// DedupWindow is how long JetStream remembers a Nats-Msg-Id, so a
	// repeated notification within it never makes a second job.
	DedupWindow time.Duration `env:"IMAGEPIPE_DEDUP_WINDOW" envDefault:"2m" doc:"JetStream duplicate window for notifications, jobs and results"`
}

func (cfg StreamConfig) normalized() StreamConfig {
	if cfg.Replicas < 1 {
		cfg.Replicas = 1
	}
	if cfg.DedupWindow <= 0 {
		cfg.DedupWindow = 2 * time.Minute
	}
	return cfg
}

// streamConfigs are the streams as imagepipe wants them.
func streamConfigs(cfg StreamConfig) []jetstream.StreamConfig {
	cfg = cfg.normalized()
	streams := []jetstream.StreamConfig{
		{
			Name:        events.StreamS3Events,
			Description: "raw MinIO bucket notifications",
			Subjects:    []string{events.SubjectS3Events},
			Retention:   jetstream.LimitsPolicy,
			MaxAge:      7 * 24 * time.Hour,
		},
		{
			Name:        events.StreamJobs,
			Description: "convert jobs, one consumer takes each",
			Subjects:    []string{events.SubjectConvertJob},
			Retention:   jetstream.WorkQueuePolicy,
		},
		{
			Name:        events.StreamResults,
			Description: "converted and failed images",
			// Alerts live beside results so that notify's one consumer
			// sees both, and the watchdog can read back its last alert.
			Subjects:  []string{events.SubjectResults, events.SubjectAlerts},
			Retention: jetstream.LimitsPolicy,
			MaxAge:    30 * 24 * time.Hour,
		},
	}
	for i := range streams {
		streams[i].Storage = jetstream.FileStorage
		streams[i].Replicas = cfg.Replicas
		streams[i].Duplicates = cfg.DedupWindow
	}
	return streams
}

func statusKVConfig(replicas int) jetstream.KeyValueConfig {
	return jetstream.KeyValueConfig{
		Bucket:      events.StatusBucket,
		Description: "current state of each input image",
		History:     5,
		Storage:     jetstream.FileStorage,
		Replicas:    max(replicas, 1),
	}
}

// JetStream creates the streams and the status bucket, or updates those
// whose settings differ from cfg. Data is never removed: an update changes
// limits, subjects or replicas in place. Settings imagepipe does not manage
// (say, a MaxBytes an operator added) are kept.
//
// Consumers are not created here. Each function creates its own durable
// consumer at start from its own settings (ack wait, attempts, back-off
// schedule), which only that function's environment knows; were setup to
// create them too, the two would rewrite each other's configuration on
// every run.
func JetStream(ctx context.Context, js jetstream.JetStream, cfg StreamConfig) (Report, error) {
	if err := waitJetStream(ctx, js); err != nil {
		return nil, err
	}
	cfg = cfg.normalized()
	var r Report
	for _, want := range streamConfigs(cfg) {
		c, err := applyStream(ctx, js, want)
		if err != nil {
			return r, err
		}
		r = append(r, c)
	}
	c, err := ApplyKV(ctx, js, statusKVConfig(cfg.Replicas))
	if err != nil {
		return r, err
	}
	return append(r, c), nil
}

// Streams creates the streams and the status bucket that do not exist yet,
// and leaves existing ones as they are. It needs only the right to read
// stream information once `imagepipe setup` has run. It makes one attempt
// (see the package comment).
func Streams(ctx context.Context, js jetstream.JetStream, cfg StreamConfig) error {
	cfg = cfg.normalized()
	for _, want := range streamConfigs(cfg) {
		_, err := js.Stream(ctx, want.Name)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			_, err = js.CreateStream(ctx, want)
			if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
				err = nil // another replica was quicker
			}
		}
		if err != nil {
			return fmt.Errorf("stream %s: %w (run `imagepipe setup` with an admin user if this user may not create it)", want.Name, deniedOr(js, err))
		}
	}
	_, err := StatusKV(ctx, js, cfg.Replicas)
	return err
}

// StatusKV opens the status bucket, creating it if it does not exist yet.
func StatusKV(ctx context.Context, js jetstream.JetStream, replicas int) (jetstream.KeyValue, error) {
	return KV(ctx, js, statusKVConfig(replicas))
}

// KV opens the key-value bucket want names as it is, and creates it from
// want only if it does not exist yet; it never changes an existing one,
// which is `imagepipe setup`'s business (ApplyKV). Replicas starting
// together may all find the bucket missing: the one whose create loses the
// race opens what the winner made. It makes one attempt (see the package
// comment).
func KV(ctx context.Context, js jetstream.JetStream, want jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	want.Replicas = max(want.Replicas, 1)
	kv, err := js.KeyValue(ctx, want.Bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		kv, err = js.CreateKeyValue(ctx, want)
		if errors.Is(err, jetstream.ErrBucketExists) {
			kv, err = js.KeyValue(ctx, want.Bucket)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("open kv %s: %w", want.Bucket, deniedOr(js, err))
	}
	return kv, nil
}

// applyStream creates the stream or brings the settings imagepipe manages
// to want, and reports the difference from what was there before; a
// creation that timed out but happened is still reported as one.
func applyStream(ctx context.Context, js jetstream.JetStream, want jetstream.StreamConfig) (Change, error) {
	c := Change{Kind: "stream", Name: want.Name}
	var before *jetstream.StreamConfig
	err := retry(ctx, func(ctx context.Context) error {
		s, err := js.Stream(ctx, want.Name)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			return nil
		}
		if err == nil {
			before = &s.CachedInfo().Config
		}
		return err
	})
	if err == nil {
		err = retry(ctx, func(ctx context.Context) error {
			s, err := js.Stream(ctx, want.Name)
			if errors.Is(err, jetstream.ErrStreamNotFound) {
				_, err = js.CreateStream(ctx, want)
				return err
			}
			if err != nil {
				return err
			}
			have := s.CachedInfo().Config
			diff := streamDiff(have, want)
			if len(diff) == 0 {
				return nil
			}
			_, err = js.UpdateStream(ctx, managedStream(have, want))
			return changing(err, diff)
		})
	}
	if err != nil {
		return c, fmt.Errorf("stream %s: %w", want.Name, err)
	}
	return applied(c, before, want, streamDiff), nil
}

// ApplyKV creates the key-value bucket want names, or brings the settings
// imagepipe manages (description, history, TTL, storage, replicas) to
// want, and reports the difference from what was there before, as
// JetStream does for the streams. Settings imagepipe does not manage are
// kept. It is how `imagepipe setup` provisions the buckets a function
// configures (convert's de-duplication records, ingest's reconcile lease)
// from that function's own settings, so that both agree on what the
// bucket should be, and so that the bucket exists, with the cluster's
// replicas, before any replica starts.
func ApplyKV(ctx context.Context, js jetstream.JetStream, want jetstream.KeyValueConfig) (Change, error) {
	want.Replicas = max(want.Replicas, 1)
	c := Change{Kind: "kv", Name: want.Bucket}
	before, err := kvConfig(ctx, js, want.Bucket)
	if err != nil {
		return c, err
	}
	err = retry(ctx, func(ctx context.Context) error {
		have, err := readKVConfig(ctx, js, want.Bucket)
		if err != nil {
			return err
		}
		if have == nil {
			_, err = js.CreateKeyValue(ctx, want)
			return err
		}
		diff := kvDiff(*have, want)
		if len(diff) == 0 {
			return nil
		}
		_, err = js.UpdateKeyValue(ctx, managedKV(*have, want))
		return changing(err, diff)
	})
	if err != nil {
		return c, fmt.Errorf("kv %s: %w", want.Bucket, err)
	}
	return applied(c, before, want, kvDiff), nil
}

// changing names, on a failed update, the settings it was changing.
func changing(err error, diff []string) error {
	if err != nil {
		return fmt.Errorf("%w (changing %s)", err, joinDiff(diff))
	}
	return nil
}

// applied completes c with what applying want did: created where there
// was nothing before, else updated by the settings that differed, or
// unchanged.
func applied[T any](c Change, before *T, want T, diff func(have, want T) []string) Change {
	c.Action = Created
	if before != nil {
		c.Action = Unchanged
		if d := diff(*before, want); len(d) > 0 {
			c.Action, c.Detail = Updated, joinDiff(d)
		}
	}
	return c
}

// managedStream is have with the settings imagepipe manages taken from
// want.
func managedStream(have, want jetstream.StreamConfig) jetstream.StreamConfig {
	have.Description, have.Subjects, have.Retention = want.Description, want.Subjects, want.Retention
	have.MaxAge, have.Duplicates = keptAge(have.MaxAge, want.MaxAge), want.Duplicates
	have.Storage, have.Replicas = want.Storage, want.Replicas
	return have
}

// managedKV is have with the settings imagepipe manages taken from want.
func managedKV(have, want jetstream.KeyValueConfig) jetstream.KeyValueConfig {
	have.Description, have.History, have.TTL = want.Description, want.History, want.TTL
	have.Storage, have.Replicas = want.Storage, want.Replicas
	return have
}

// waitJetStream waits until the JetStream API answers: a cluster that has
// just started takes a few seconds to elect its meta leader, and setup is
// usually started together with it.
func waitJetStream(ctx context.Context, js jetstream.JetStream) error {
	err := retry(ctx, func(ctx context.Context) error {
		_, err := js.AccountInfo(ctx)
		if errors.Is(err, jetstream.ErrJetStreamNotEnabled) {
			// Also what a cluster without a meta leader answers.
			return errTransient{err}
		}
		return err
	})
	if err != nil {
		return fmt.Errorf("jetstream not available: %w", err)
	}
	return nil
}

// retryFor bounds how long a step waits out a cluster that is electing
// leaders or still gathering its peers.
const retryFor = 45 * time.Second

// retry runs op until it succeeds, fails for good, or retryFor passes.
// Each attempt gets its own deadline so that a request lost while a leader
// moves is asked again.
func retry(ctx context.Context, op func(context.Context) error) error {
	deadline := time.Now().Add(retryFor)
	wait := 200 * time.Millisecond
	for {
		actx, cancel := context.WithTimeout(ctx, 10*time.Second)
		err := op(actx)
		cancel()
		if err == nil || !transient(err) || ctx.Err() != nil || time.Now().After(deadline) {
			var t errTransient
			if errors.As(err, &t) {
				return t.err
			}
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(wait):
		}
		wait = min(2*wait, time.Second)
	}
}

// deniedOr is err, unless it is a request the NATS user may not make:
// the server drops those, so they time out like a slow cluster, and
// retrying would only wait out retryFor before saying so.
func deniedOr(js jetstream.JetStream, err error) error {
	if denied := natsrt.Denied(js.Conn(), err); denied != nil {
		return denied
	}
	return err
}

type errTransient struct{ err error }

func (e errTransient) Error() string { return e.err.Error() }
func (e errTransient) Unwrap() error { return e.err }

// transient reports errors a JetStream cluster gives while it is forming or
// moving a leader: no responders, timeouts, "temporarily unavailable" (503)
// and "insufficient resources" while not every peer has joined yet.
func transient(err error) bool {
	var t errTransient
	if errors.As(err, &t) {
		return true
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, jetstream.ErrNoStreamResponse) {
		return true
	}
	var api *jetstream.APIError
	if errors.As(err, &api) {
		return api.Code == 503 || api.ErrorCode == 10005 || api.ErrorCode == 10008
	}
	return isTimeoutOrNoResponders(err)
}

// kvConfig is a bucket's configuration, or nil if it does not exist.
func kvConfig(ctx context.Context, js jetstream.JetStream, bucket string) (*jetstream.KeyValueConfig, error) {
	var cfg *jetstream.KeyValueConfig
	err := retry(ctx, func(ctx context.Context) error {
		var err error
		cfg, err = readKVConfig(ctx, js, bucket)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("kv %s: %w", bucket, err)
	}
	return cfg, nil
}

func readKVConfig(ctx context.Context, js jetstream.JetStream, bucket string) (*jetstream.KeyValueConfig, error) {
	kv, err := js.KeyValue(ctx, bucket)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	st, err := kv.Status(ctx)
	if err != nil {
		return nil, err
	}
	cfg := st.Config()
	return &cfg, nil
}
