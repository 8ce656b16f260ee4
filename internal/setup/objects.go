package setup

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"slices"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/lifecycle"
	"github.com/minio/minio-go/v7/pkg/notification"

	"github.com/imagepipe/imagepipe/events"
)

// BucketConfig says which MinIO notification target feeds imagepipe.
type BucketConfig struct {
	// NotifyTarget is the id of MinIO's NATS target
	// (MINIO_NOTIFY_NATS_*_<ID>); empty skips subscribing the bucket, for
	// S3 services that are wired some other way.
	NotifyTarget string `env:"IMAGEPIPE_MINIO_NOTIFY_TARGET" envDefault:"PRIMARY" doc:"id of MinIO's NATS notification target (MINIO_NOTIFY_NATS_*_ID) that ingest subscribes the input bucket to; empty leaves the bucket's notifications alone, for S3 services wired some other way"`
}

// ObjectConfig is what ObjectStore provisions.
type ObjectConfig struct {
	InputBucket  string
	OutputBucket string
	// NotifyTarget as in BucketConfig; empty skips the notification.
	NotifyTarget string
}

// Error reports are written beside the inputs, under events.ErrorPrefix in
// the input bucket; the lifecycle rule ErrorReportRule removes them after
// ErrorReportDays.
const (
	ErrorReportDays   = 30
	ErrorReportRuleID = "imagepipe-expire-error-reports"
)

// ErrorReportRule is the lifecycle rule setup keeps on the input bucket.
// infra/minio/lifecycle-errors.json holds the same rule for `mc ilm import`.
func ErrorReportRule() lifecycle.Rule {
	return lifecycle.Rule{
		ID:         ErrorReportRuleID,
		Status:     "Enabled",
		RuleFilter: lifecycle.Filter{Prefix: events.ErrorPrefix},
		Expiration: lifecycle.Expiration{Days: ErrorReportDays},
	}
}

// ObjectStore creates the input and output buckets, keeps the error-report
// lifecycle rule on the input bucket, and subscribes the input bucket to
// MinIO's NATS target. Other lifecycle rules and notification
// configurations the buckets have are kept.
func ObjectStore(ctx context.Context, c *minio.Client, cfg ObjectConfig) (Report, error) {
	if cfg.InputBucket == "" || cfg.OutputBucket == "" {
		return nil, errors.New("setup: input and output bucket names are required")
	}
	names := []string{cfg.InputBucket}
	if cfg.OutputBucket != cfg.InputBucket {
		names = append(names, cfg.OutputBucket)
	}
	var r Report
	for _, name := range names {
		ch, err := ensureBucket(ctx, c, name)
		if err != nil {
			return r, err
		}
		r = append(r, ch)
	}
	ch, err := ensureLifecycle(ctx, c, cfg.InputBucket, ErrorReportRule())
	if err != nil {
		return r, err
	}
	r = append(r, ch)
	if cfg.NotifyTarget != "" {
		ch, err := ensureNotification(ctx, c, cfg.InputBucket, cfg.NotifyTarget)
		if err != nil {
			return r, err
		}
		r = append(r, ch)
	}
	return r, nil
}

// Buckets creates the S3 buckets that do not exist yet.
func Buckets(ctx context.Context, c *minio.Client, names ...string) error {
	for _, name := range names {
		if _, err := ensureBucket(ctx, c, name); err != nil {
			return err
		}
	}
	return nil
}

// Notification subscribes the bucket's created-object events to MinIO's
// NATS target unless it already is, keeping any other configuration the
// bucket has.
func Notification(ctx context.Context, c *minio.Client, bucket, targetID string) error {
	_, err := ensureNotification(ctx, c, bucket, targetID)
	return err
}

// NotificationARN is MinIO's ARN for its NATS target with the given id.
func NotificationARN(targetID string) notification.Arn {
	return notification.NewArn("minio", "sqs", "", targetID, "nats")
}

func ensureBucket(ctx context.Context, c *minio.Client, name string) (Change, error) {
	ch := Change{Kind: "bucket", Name: name, Action: Unchanged}
	ok, err := c.BucketExists(ctx, name)
	if err != nil {
		return ch, fmt.Errorf("check bucket %s: %w", name, err)
	}
	if ok {
		return ch, nil
	}
	if err := c.MakeBucket(ctx, name, minio.MakeBucketOptions{}); err != nil {
		if minio.ToErrorResponse(err).Code == "BucketAlreadyOwnedByYou" {
			return ch, nil
		}
		return ch, fmt.Errorf("create bucket %s: %w", name, err)
	}
	ch.Action = Created
	return ch, nil
}

func ensureLifecycle(ctx context.Context, c *minio.Client, bucket string, want lifecycle.Rule) (Change, error) {
	ch := Change{Kind: "lifecycle", Name: bucket + " " + want.ID, Action: Unchanged}
	cfg, err := c.GetBucketLifecycle(ctx, bucket)
	if minio.ToErrorResponse(err).Code == "NoSuchLifecycleConfiguration" {
		cfg, err = lifecycle.NewConfiguration(), nil
	}
	if err != nil {
		return ch, fmt.Errorf("read lifecycle of %s: %w", bucket, err)
	}
	found := false
	for i, rule := range cfg.Rules {
		if rule.ID != want.ID {
			continue
		}
		found = true
		if sameRule(rule, want) {
			return ch, nil
		}
		cfg.Rules[i] = want
		ch.Action, ch.Detail = Updated, fmt.Sprintf("expire %s after %d days", events.ErrorPrefix, ErrorReportDays)
	}
	if !found {
		cfg.Rules = append(cfg.Rules, want)
		ch.Action = Created
	}
	if err := c.SetBucketLifecycle(ctx, bucket, cfg); err != nil {
		return ch, fmt.Errorf("set lifecycle of %s: %w", bucket, err)
	}
	return ch, nil
}

// sameRule compares the parts of a rule setup writes; the server may fill
// in others.
func sameRule(a, b lifecycle.Rule) bool {
	return a.Status == b.Status &&
		a.RuleFilter.Prefix == b.RuleFilter.Prefix &&
		reflect.DeepEqual(a.RuleFilter.And, b.RuleFilter.And) &&
		a.RuleFilter.Tag == b.RuleFilter.Tag &&
		a.Expiration.Days == b.Expiration.Days &&
		a.Expiration.Date.IsZero() == b.Expiration.Date.IsZero()
}

func ensureNotification(ctx context.Context, c *minio.Client, bucket, targetID string) (Change, error) {
	arn := NotificationARN(targetID)
	ch := Change{Kind: "notification", Name: bucket + " → " + arn.String(), Action: Unchanged}
	cfg, err := c.GetBucketNotification(ctx, bucket)
	if err != nil {
		return ch, fmt.Errorf("read notification config of %s: %w", bucket, err)
	}
	for _, qc := range cfg.QueueConfigs {
		// MinIO returns the queue ARN as a string; AddQueue's own
		// duplicate check compares parsed ARNs and misses it.
		if qc.Queue == arn.String() && slices.Contains(qc.Events, notification.ObjectCreatedAll) && unfiltered(qc.Filter) {
			return ch, nil
		}
	}
	q := notification.NewConfig(arn)
	q.AddEvents(notification.ObjectCreatedAll)
	cfg.AddQueue(q)
	if err := c.SetBucketNotification(ctx, bucket, cfg); err != nil {
		var er minio.ErrorResponse
		if errors.As(err, &er) && er.Code == "InvalidArgument" {
			return ch, fmt.Errorf("subscribe %s to MinIO target %s: %w (is MINIO_NOTIFY_NATS_ENABLE_%s=on set on the MinIO server?)", bucket, targetID, err, targetID)
		}
		return ch, fmt.Errorf("subscribe %s to MinIO target %s: %w", bucket, targetID, err)
	}
	ch.Action = Created
	return ch, nil
}

func unfiltered(f *notification.Filter) bool {
	return f == nil || len(f.S3Key.FilterRules) == 0
}
