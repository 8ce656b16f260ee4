// Package setup provisions what imagepipe needs before anything flows: the
// JetStream streams and status bucket, the S3 buckets with their lifecycle
// rule, and MinIO's bucket notification.
//
// There are two ways in. JetStream and ObjectStore create or update
// everything and report each change; `imagepipe setup` and `imagepipe dev`
// use them. Streams, StatusKV, Buckets and Notification only create what is
// missing and leave what exists alone; every function calls them at start,
// so that a function runs with credentials that may read but not change the
// streams, and a replica started with stale settings never undoes what the
// operator's last setup decided (say, scales a replicated stream down).
package setup

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
)

// StreamConfig sizes the streams.
type StreamConfig struct {
	Replicas int `env:"IMAGEPIPE_STREAM_REPLICAS" envDefault:"1"`
	// DedupWindow is how long JetStream remembers a Nats-Msg-Id, so a
	// repeated notification within it never makes a second job.
	DedupWindow time.Duration `env:"IMAGEPIPE_DEDUP_WINDOW" envDefault:"2m"`
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
	c, err := applyKV(ctx, js, statusKVConfig(cfg.Replicas))
	if err != nil {
		return r, err
	}
	return append(r, c), nil
}

// Streams creates the streams and the status bucket that do not exist yet,
// and leaves existing ones as they are. It needs only the right to read
// stream information once `imagepipe setup` has run.
func Streams(ctx context.Context, js jetstream.JetStream, cfg StreamConfig) error {
	cfg = cfg.normalized()
	for _, want := range streamConfigs(cfg) {
		if err := retry(ctx, func(ctx context.Context) error {
			_, err := js.Stream(ctx, want.Name)
			if errors.Is(err, jetstream.ErrStreamNotFound) {
				_, err = js.CreateStream(ctx, want)
				if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
					return nil // another replica was quicker
				}
			}
			return err
		}); err != nil {
			return fmt.Errorf("stream %s: %w (run `imagepipe setup` with an admin user if this user may not create it)", want.Name, err)
		}
	}
	_, err := StatusKV(ctx, js, cfg.Replicas)
	return err
}

// StatusKV opens the status bucket, creating it if it does not exist yet.
func StatusKV(ctx context.Context, js jetstream.JetStream, replicas int) (jetstream.KeyValue, error) {
	var kv jetstream.KeyValue
	err := retry(ctx, func(ctx context.Context) error {
		var err error
		kv, err = js.KeyValue(ctx, events.StatusBucket)
		if errors.Is(err, jetstream.ErrBucketNotFound) {
			kv, err = js.CreateKeyValue(ctx, statusKVConfig(replicas))
			if errors.Is(err, jetstream.ErrBucketExists) {
				kv, err = js.KeyValue(ctx, events.StatusBucket)
			}
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open kv %s: %w", events.StatusBucket, err)
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
			upd := have
			upd.Description = want.Description
			upd.Subjects = want.Subjects
			upd.Retention = want.Retention
			upd.MaxAge = keptAge(have.MaxAge, want.MaxAge)
			upd.Duplicates = want.Duplicates
			upd.Storage = want.Storage
			upd.Replicas = want.Replicas
			if _, err := js.UpdateStream(ctx, upd); err != nil {
				return fmt.Errorf("%w (changing %s)", err, joinDiff(diff))
			}
			return nil
		})
	}
	if err != nil {
		return c, fmt.Errorf("stream %s: %w", want.Name, err)
	}
	c.Action = Created
	if before != nil {
		c.Action = Unchanged
		if d := streamDiff(*before, want); len(d) > 0 {
			c.Action, c.Detail = Updated, joinDiff(d)
		}
	}
	return c, nil
}

// applyKV does for a key-value bucket what applyStream does for a stream.
func applyKV(ctx context.Context, js jetstream.JetStream, want jetstream.KeyValueConfig) (Change, error) {
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
		upd := *have
		upd.Description = want.Description
		upd.History = want.History
		upd.TTL = want.TTL
		upd.Storage = want.Storage
		upd.Replicas = want.Replicas
		if _, err := js.UpdateKeyValue(ctx, upd); err != nil {
			return fmt.Errorf("%w (changing %s)", err, joinDiff(diff))
		}
		return nil
	})
	if err != nil {
		return c, fmt.Errorf("kv %s: %w", want.Bucket, err)
	}
	c.Action = Created
	if before != nil {
		c.Action = Unchanged
		if d := kvDiff(*before, want); len(d) > 0 {
			c.Action, c.Detail = Updated, joinDiff(d)
		}
	}
	return c, nil
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

// OwnedKV runs open, the code with which a function creates or updates a
// key-value bucket it alone configures (convert's de-duplication records,
// say), and reports what that changed. Running it from setup means the
// bucket exists, with the cluster's replicas, before any replica starts:
// replicas starting together then find it instead of racing to create it,
// which a JetStream cluster can answer with a timeout to both.
func OwnedKV(ctx context.Context, js jetstream.JetStream, bucket string, open func(context.Context) error) (Change, error) {
	c := Change{Kind: "kv", Name: bucket}
	before, err := kvConfig(ctx, js, bucket)
	if err != nil {
		return c, err
	}
	if err := retry(ctx, open); err != nil {
		return c, fmt.Errorf("kv %s: %w", bucket, err)
	}
	after, err := kvConfig(ctx, js, bucket)
	if err != nil {
		return c, err
	}
	switch {
	case after == nil:
		return c, fmt.Errorf("kv %s: still missing after it was opened", bucket)
	case before == nil:
		c.Action = Created
	default:
		if d := kvDiff(*before, *after); len(d) > 0 {
			c.Action, c.Detail = Updated, joinDiff(d)
		} else {
			c.Action = Unchanged
		}
	}
	return c, nil
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
