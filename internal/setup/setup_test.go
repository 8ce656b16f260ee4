package setup_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/lifecycle"
	"github.com/minio/minio-go/v7/pkg/notification"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/minioserver"
	"github.com/imagepipe/imagepipe/internal/natstest"
	"github.com/imagepipe/imagepipe/internal/setup"
	"github.com/imagepipe/imagepipe/test/stack"
)

// One MinIO for the package, each test in its own buckets; each JetStream
// test gets its own NATS server, since stream names are fixed.
var s3 *minio.Client

func TestMain(m *testing.M) {
	stack.Main(m, func(ms *stack.MinIO) (err error) { s3, err = ms.Client(); return err })
}

// testBucket is a bucket name of this run's own: the package's MinIO
// outlives a test, and -count runs each test again against it.
func testBucket(base string) string {
	return fmt.Sprintf("%s-%d", base, time.Now().UnixNano())
}

func startJetStream(t *testing.T) jetstream.JetStream {
	_, js := natstest.Start(t)
	return js
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), stack.Scaled(60*time.Second))
	t.Cleanup(cancel)
	return c
}

func lines(r setup.Report) []string {
	var out []string
	for _, c := range r {
		out = append(out, c.String())
	}
	return out
}

func TestSetupTwiceChangesNothingTheSecondTime(t *testing.T) {
	js := startJetStream(t)
	cfg := setup.StreamConfig{Replicas: 1, DedupWindow: 2 * time.Minute}
	in, out := testBucket("twice-in"), testBucket("twice-out")
	objs := setup.ObjectConfig{InputBucket: in, OutputBucket: out, NotifyTarget: minioserver.TargetID}

	first, err := setup.JetStream(ctx(t), js, cfg)
	if err != nil {
		t.Fatal(err)
	}
	firstObjs, err := setup.ObjectStore(ctx(t), s3, objs)
	if err != nil {
		t.Fatal(err)
	}
	first = append(first, firstObjs...)
	want := []string{
		"created stream S3_EVENTS",
		"created stream JOBS",
		"created stream RESULTS",
		"created kv " + events.StatusBucket,
		"created bucket " + in,
		"created bucket " + out,
		"created lifecycle " + in + " " + setup.ErrorReportRuleID,
		"created notification " + in + " → arn:minio:sqs::PRIMARY:nats",
	}
	if got := lines(first); !slices.Equal(got, want) {
		t.Fatalf("first run:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	second, err := setup.JetStream(ctx(t), js, cfg)
	if err != nil {
		t.Fatal(err)
	}
	secondObjs, err := setup.ObjectStore(ctx(t), s3, objs)
	if err != nil {
		t.Fatal(err)
	}
	second = append(second, secondObjs...)
	if second.Changed() {
		t.Fatalf("second run changed something:\n%s", strings.Join(lines(second), "\n"))
	}
	if len(second) != len(want) {
		t.Fatalf("second run reported %d things, want %d:\n%s", len(second), len(want), strings.Join(lines(second), "\n"))
	}
	for _, c := range second {
		if !strings.HasPrefix(c.String(), "unchanged: ") {
			t.Errorf("line %q does not say unchanged", c)
		}
	}
}

func TestSetupRerunKeepsStreamMessages(t *testing.T) {
	js := startJetStream(t)
	cfg := setup.StreamConfig{Replicas: 1, DedupWindow: 2 * time.Minute}
	if _, err := setup.JetStream(ctx(t), js, cfg); err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		for _, subj := range []string{events.SubjectS3Events, events.SubjectConvertJob, events.SubjectConverted} {
			if _, err := js.Publish(ctx(t), subj, []byte(fmt.Sprintf(`{"n":%d}`, i))); err != nil {
				t.Fatal(err)
			}
		}
	}
	kv, err := js.KeyValue(ctx(t), events.StatusBucket)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx(t), "some.key", []byte("READY")); err != nil {
		t.Fatal(err)
	}

	// A re-run with a changed setting updates in place; one without
	// changes nothing. Neither may lose a message.
	cfg.DedupWindow = 5 * time.Minute
	r, err := setup.JetStream(ctx(t), js, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if got := r[1].String(); got != "updated stream JOBS (duplicate window 2m0s → 5m0s)" {
		t.Errorf("update reported as %q", got)
	}
	if r, err = setup.JetStream(ctx(t), js, cfg); err != nil {
		t.Fatal(err)
	}
	if r.Changed() {
		t.Errorf("third run changed something: %v", lines(r))
	}

	for _, name := range []string{events.StreamS3Events, events.StreamJobs, events.StreamResults} {
		s, err := js.Stream(ctx(t), name)
		if err != nil {
			t.Fatal(err)
		}
		if n := s.CachedInfo().State.Msgs; n != 5 {
			t.Errorf("stream %s holds %d messages after re-runs, want 5", name, n)
		}
		if d := s.CachedInfo().Config.Duplicates; d != 5*time.Minute {
			t.Errorf("stream %s duplicate window %s, want 5m", name, d)
		}
	}
	e, err := kv.Get(ctx(t), "some.key")
	if err != nil || string(e.Value()) != "READY" {
		t.Errorf("status record after re-runs: %v, %v", e, err)
	}
}

func TestSetupUpdatesAStreamAnOlderReleaseMadeAndKeepsOperatorSettings(t *testing.T) {
	js := startJetStream(t)
	// RESULTS as releases without queue alerts made it, plus a size limit
	// an operator added by hand and a year of history instead of 30 days.
	old := jetstream.StreamConfig{
		Name: events.StreamResults, Subjects: []string{events.SubjectResults},
		Storage: jetstream.FileStorage, MaxAge: 365 * 24 * time.Hour, Duplicates: 2 * time.Minute,
		MaxBytes: 1 << 30,
	}
	if _, err := js.CreateStream(ctx(t), old); err != nil {
		t.Fatal(err)
	}
	if _, err := js.Publish(ctx(t), events.SubjectFailed, []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	r, err := setup.JetStream(ctx(t), js, setup.StreamConfig{})
	if err != nil {
		t.Fatal(err)
	}
	got := r[2].String()
	if !strings.HasPrefix(got, "updated stream RESULTS (subjects [imagepipe.results.>] → [imagepipe.results.> imagepipe.alerts.>]") {
		t.Errorf("RESULTS update reported as %q", got)
	}
	s, err := js.Stream(ctx(t), events.StreamResults)
	if err != nil {
		t.Fatal(err)
	}
	info := s.CachedInfo()
	if info.State.Msgs != 1 || info.Config.MaxBytes != 1<<30 || info.Config.MaxAge != 365*24*time.Hour {
		t.Errorf("after update: %d messages, max bytes %d, max age %s; want 1 and the operator's 1 GiB and year", info.State.Msgs, info.Config.MaxBytes, info.Config.MaxAge)
	}
	if _, err := js.Publish(ctx(t), events.SubjectStalled, []byte(`{}`)); err != nil {
		t.Errorf("alerts not stored after update: %v", err)
	}
}

func TestFunctionStartNeverChangesExistingStreams(t *testing.T) {
	js := startJetStream(t)
	if _, err := setup.JetStream(ctx(t), js, setup.StreamConfig{DedupWindow: 10 * time.Minute}); err != nil {
		t.Fatal(err)
	}
	// A replica started with other settings must not rewrite what setup
	// decided.
	if err := setup.Streams(ctx(t), js, setup.StreamConfig{DedupWindow: time.Minute}); err != nil {
		t.Fatal(err)
	}
	s, err := js.Stream(ctx(t), events.StreamJobs)
	if err != nil {
		t.Fatal(err)
	}
	if d := s.CachedInfo().Config.Duplicates; d != 10*time.Minute {
		t.Errorf("duplicate window %s after a function started, want setup's 10m", d)
	}
}

func TestFunctionStartCreatesMissingStreams(t *testing.T) {
	js := startJetStream(t)
	if err := setup.Streams(ctx(t), js, setup.StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	r, err := setup.JetStream(ctx(t), js, setup.StreamConfig{})
	if err != nil {
		t.Fatal(err)
	}
	if r.Changed() {
		t.Errorf("setup after a function made the streams changed: %v", lines(r))
	}
}

func TestSetupKeepsOtherLifecycleRulesAndNotifications(t *testing.T) {
	in := testBucket("keep-in")
	if err := s3.MakeBucket(ctx(t), in, minio.MakeBucketOptions{}); err != nil {
		t.Fatal(err)
	}
	lc := lifecycle.NewConfiguration()
	lc.Rules = []lifecycle.Rule{{
		ID: "operator-tmp", Status: "Enabled",
		RuleFilter: lifecycle.Filter{Prefix: "tmp/"}, Expiration: lifecycle.Expiration{Days: 1},
	}, {
		// imagepipe's rule, edited by hand to a week: setup puts it back.
		ID: setup.ErrorReportRuleID, Status: "Enabled",
		RuleFilter: lifecycle.Filter{Prefix: events.ErrorPrefix}, Expiration: lifecycle.Expiration{Days: 7},
	}}
	if err := s3.SetBucketLifecycle(ctx(t), in, lc); err != nil {
		t.Fatal(err)
	}
	nc := notification.Configuration{}
	q := notification.NewConfig(setup.NotificationARN(minioserver.TargetID))
	q.AddEvents(notification.ObjectRemovedAll)
	q.AddFilterPrefix("audit/")
	nc.AddQueue(q)
	if err := s3.SetBucketNotification(ctx(t), in, nc); err != nil {
		t.Fatal(err)
	}

	r, err := setup.ObjectStore(ctx(t), s3, setup.ObjectConfig{InputBucket: in, OutputBucket: in, NotifyTarget: minioserver.TargetID})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"unchanged: bucket " + in,
		"updated lifecycle " + in + " " + setup.ErrorReportRuleID + " (expire errors/ after 30 days)",
		"created notification " + in + " → arn:minio:sqs::PRIMARY:nats",
	}
	if got := lines(r); !slices.Equal(got, want) {
		t.Errorf("report %q, want %q", got, want)
	}
	got, err := s3.GetBucketLifecycle(ctx(t), in)
	if err != nil {
		t.Fatal(err)
	}
	days := map[string]lifecycle.ExpirationDays{}
	for _, rule := range got.Rules {
		days[rule.ID] = rule.Expiration.Days
	}
	if days["operator-tmp"] != 1 || days[setup.ErrorReportRuleID] != setup.ErrorReportDays || len(days) != 2 {
		t.Errorf("rules after setup: %v", days)
	}
	after, err := s3.GetBucketNotification(ctx(t), in)
	if err != nil {
		t.Fatal(err)
	}
	var kinds []string
	for _, qc := range after.QueueConfigs {
		for _, e := range qc.Events {
			kinds = append(kinds, string(e))
		}
	}
	slices.Sort(kinds)
	if want := []string{"s3:ObjectCreated:*", "s3:ObjectRemoved:*"}; !slices.Equal(kinds, want) {
		t.Errorf("notification events after setup %v, want the operator's removals kept beside imagepipe's creations %v", kinds, want)
	}
}

func TestApplyKVReportsWhatTheFunctionsOwnSettingsChanged(t *testing.T) {
	js := startJetStream(t)
	for _, tt := range []struct {
		ttl  time.Duration
		want string
	}{
		{time.Hour, "created kv owned"},
		{time.Hour, "unchanged: kv owned"},
		{2 * time.Hour, "updated kv owned (ttl 1h0m0s → 2h0m0s)"},
	} {
		c, err := setup.ApplyKV(ctx(t), js, jetstream.KeyValueConfig{Bucket: "owned", History: 1, TTL: tt.ttl})
		if err != nil {
			t.Fatal(err)
		}
		if c.String() != tt.want {
			t.Errorf("got %q, want %q", c, tt.want)
		}
	}
}
