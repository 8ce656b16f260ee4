// Package setup provisions what imagepipe needs before anything flows: the
// JetStream streams and key-value buckets, the S3 buckets, and MinIO's
// bucket notification. Every step is idempotent; every replica and
// `imagepipe dev` run it at start.
package setup

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/notification"
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

// Streams creates or updates the streams and the status bucket. MinIO only
// publishes, so S3_EVENTS must exist before the bucket notification is set.
func Streams(ctx context.Context, js jetstream.JetStream, cfg StreamConfig) error {
	if cfg.Replicas < 1 {
		cfg.Replicas = 1
	}
	if cfg.DedupWindow <= 0 {
		cfg.DedupWindow = 2 * time.Minute
	}
	streams := []jetstream.StreamConfig{
		{
			Name:        events.StreamS3Events,
			Description: "raw MinIO bucket notifications",
			Subjects:    []string{events.SubjectS3Events},
			Retention:   jetstream.LimitsPolicy,
			MaxAge:      7 * 24 * time.Hour,
			Duplicates:  cfg.DedupWindow,
		},
		{
			Name:        events.StreamJobs,
			Description: "convert jobs, one consumer takes each",
			Subjects:    []string{events.SubjectConvertJob},
			Retention:   jetstream.WorkQueuePolicy,
			Duplicates:  cfg.DedupWindow,
		},
		{
			Name:        events.StreamResults,
			Description: "converted and failed images",
			Subjects:    []string{events.SubjectResults, events.SubjectAlerts},
			Retention:   jetstream.LimitsPolicy,
			MaxAge:      30 * 24 * time.Hour,
			Duplicates:  cfg.DedupWindow,
		},
	}
	for _, sc := range streams {
		sc.Storage = jetstream.FileStorage
		sc.Replicas = cfg.Replicas
		if _, err := js.CreateOrUpdateStream(ctx, sc); err != nil {
			return fmt.Errorf("create stream %s: %w", sc.Name, err)
		}
	}
	if _, err := StatusKV(ctx, js, cfg.Replicas); err != nil {
		return err
	}
	return nil
}

// StatusKV creates or opens the status bucket.
func StatusKV(ctx context.Context, js jetstream.JetStream, replicas int) (jetstream.KeyValue, error) {
	if replicas < 1 {
		replicas = 1
	}
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket:      events.StatusBucket,
		Description: "current state of each input image",
		History:     5,
		Storage:     jetstream.FileStorage,
		Replicas:    replicas,
	})
	if err != nil {
		return nil, fmt.Errorf("create kv %s: %w", events.StatusBucket, err)
	}
	return kv, nil
}

// Buckets creates the S3 buckets that do not exist yet.
func Buckets(ctx context.Context, c *minio.Client, names ...string) error {
	for _, name := range names {
		ok, err := c.BucketExists(ctx, name)
		if err != nil {
			return fmt.Errorf("check bucket %s: %w", name, err)
		}
		if ok {
			continue
		}
		if err := c.MakeBucket(ctx, name, minio.MakeBucketOptions{}); err != nil {
			if minio.ToErrorResponse(err).Code == "BucketAlreadyOwnedByYou" {
				continue
			}
			return fmt.Errorf("create bucket %s: %w", name, err)
		}
	}
	return nil
}

// BucketConfig says which MinIO notification target feeds imagepipe.
type BucketConfig struct {
	// NotifyTarget is the id of MinIO's NATS target
	// (MINIO_NOTIFY_NATS_*_<ID>); empty skips subscribing the bucket, for
	// S3 services that are wired some other way.
	NotifyTarget string `env:"IMAGEPIPE_MINIO_NOTIFY_TARGET" envDefault:"PRIMARY"`
}

// NotificationARN is MinIO's ARN for its NATS target with the given id.
func NotificationARN(targetID string) notification.Arn {
	return notification.NewArn("minio", "sqs", "", targetID, "nats")
}

// Notification subscribes the bucket's created-object events to MinIO's
// NATS target, keeping any other configuration the bucket has.
func Notification(ctx context.Context, c *minio.Client, bucket, targetID string) error {
	cfg, err := c.GetBucketNotification(ctx, bucket)
	if err != nil {
		return fmt.Errorf("read notification config of %s: %w", bucket, err)
	}
	arn := NotificationARN(targetID)
	for _, qc := range cfg.QueueConfigs {
		// MinIO returns the queue ARN as a string; AddQueue's own
		// duplicate check compares parsed ARNs and misses it.
		if qc.Queue == arn.String() {
			return nil
		}
	}
	q := notification.NewConfig(arn)
	q.AddEvents(notification.ObjectCreatedAll)
	cfg.AddQueue(q)
	if err := c.SetBucketNotification(ctx, bucket, cfg); err != nil {
		var er minio.ErrorResponse
		if errors.As(err, &er) && er.Code == "InvalidArgument" {
			return fmt.Errorf("subscribe %s to MinIO target %s: %w (is MINIO_NOTIFY_NATS_ENABLE_%s=on set on the MinIO server?)", bucket, targetID, err, targetID)
		}
		return fmt.Errorf("subscribe %s to MinIO target %s: %w", bucket, targetID, err)
	}
	return nil
}
