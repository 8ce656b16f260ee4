package infra

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/minio/minio-go/v7/pkg/lifecycle"
	"github.com/minio/minio-go/v7/pkg/tags"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/freeport"
	"github.com/imagepipe/imagepipe/internal/minioserver"
	"github.com/imagepipe/imagepipe/internal/setup"
	"github.com/imagepipe/imagepipe/test/stack"
)

const (
	rootUser   = stack.AccessKey
	rootSecret = stack.SecretKey
	// The bucket names the policies in minio/ are written for.
	inputBucket  = "uploads"
	outputBucket = "images"
)

func TestMain(m *testing.M) { stack.Main(m) }

// sharedMinIO is the package's MinIO, its notification target a plain NATS
// server, for the policy tests.
func sharedMinIO(t *testing.T) string {
	t.Helper()
	return stack.PackageMinIO(t).Endpoint
}

func rootClient(t *testing.T, endpoint string) *minio.Client {
	t.Helper()
	c, err := minio.New(endpoint, &minio.Options{Creds: credentials.NewStaticV4(rootUser, rootSecret, "")})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// policyClient has exactly the rights of the policy file: MinIO's STS
// AssumeRole with the root user's credentials and the file as session
// policy evaluates every request against that policy alone.
func policyClient(t *testing.T, endpoint, file string) *minio.Client {
	t.Helper()
	policy, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, policy); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	creds, err := credentials.NewSTSAssumeRole("http://"+endpoint, credentials.STSAssumeRoleOptions{
		AccessKey: rootUser, SecretKey: rootSecret, Policy: compact.String(),
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := creds.Get(); err != nil {
		t.Fatalf("%s: MinIO refuses it as a policy: %v", file, err)
	}
	c, err := minio.New(endpoint, &minio.Options{Creds: creds})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// s3op is one request a function makes, or must not be able to make.
type s3op struct {
	name string
	do   func(ctx context.Context, c *minio.Client) error
}

func put(bucket, key string) s3op {
	return s3op{"put " + bucket + "/" + key, func(ctx context.Context, c *minio.Client) error {
		_, err := c.PutObject(ctx, bucket, key, strings.NewReader("x"), 1, minio.PutObjectOptions{})
		return err
	}}
}

func get(bucket, key string) s3op {
	return s3op{"get " + bucket + "/" + key, func(ctx context.Context, c *minio.Client) error {
		o, err := c.GetObject(ctx, bucket, key, minio.GetObjectOptions{})
		if err != nil {
			return err
		}
		defer o.Close()
		_, err = io.ReadAll(o)
		return err
	}}
}

func stat(bucket, key string) s3op {
	return s3op{"stat " + bucket + "/" + key, func(ctx context.Context, c *minio.Client) error {
		_, err := c.StatObject(ctx, bucket, key, minio.StatObjectOptions{})
		return err
	}}
}

func remove(bucket, key string) s3op {
	return s3op{"delete " + bucket + "/" + key, func(ctx context.Context, c *minio.Client) error {
		return c.RemoveObject(ctx, bucket, key, minio.RemoveObjectOptions{})
	}}
}

func list(bucket string) s3op {
	return s3op{"list " + bucket, func(ctx context.Context, c *minio.Client) error {
		for o := range c.ListObjects(ctx, bucket, minio.ListObjectsOptions{Recursive: true}) {
			return o.Err
		}
		return nil
	}}
}

func headBucket(bucket string) s3op {
	return s3op{"head bucket " + bucket, func(ctx context.Context, c *minio.Client) error {
		ok, err := c.BucketExists(ctx, bucket)
		if err == nil && !ok {
			return errors.New("bucket missing")
		}
		return err
	}}
}

func copyObject(bucket, from, to string) s3op {
	return s3op{"copy " + bucket + "/" + from + " to " + to, func(ctx context.Context, c *minio.Client) error {
		_, err := c.CopyObject(ctx, minio.CopyDestOptions{Bucket: bucket, Object: to}, minio.CopySrcOptions{Bucket: bucket, Object: from})
		return err
	}}
}

func copyTagged(bucket, from, to string) s3op {
	return s3op{"copy " + bucket + "/" + from + " to " + to + " with tags", func(ctx context.Context, c *minio.Client) error {
		_, err := c.CopyObject(ctx, minio.CopyDestOptions{Bucket: bucket, Object: to, UserTags: map[string]string{"imagepipe-sha256": "ab"}, ReplaceTags: true},
			minio.CopySrcOptions{Bucket: bucket, Object: from})
		return err
	}}
}

func tag(bucket, key string) s3op {
	return s3op{"tag " + bucket + "/" + key, func(ctx context.Context, c *minio.Client) error {
		t, err := tags.NewTags(map[string]string{"imagepipe-sha256": "ab"}, true)
		if err != nil {
			return err
		}
		return c.PutObjectTagging(ctx, bucket, key, t, minio.PutObjectTaggingOptions{})
	}}
}

func readTags(bucket, key string) s3op {
	return s3op{"read tags of " + bucket + "/" + key, func(ctx context.Context, c *minio.Client) error {
		_, err := c.GetObjectTagging(ctx, bucket, key, minio.GetObjectTaggingOptions{})
		return err
	}}
}

func makeBucket(bucket string) s3op {
	return s3op{"create bucket " + bucket, func(ctx context.Context, c *minio.Client) error {
		return c.MakeBucket(ctx, bucket, minio.MakeBucketOptions{})
	}}
}

func getNotification(bucket string) s3op {
	return s3op{"read notification of " + bucket, func(ctx context.Context, c *minio.Client) error {
		_, err := c.GetBucketNotification(ctx, bucket)
		return err
	}}
}

func removeNotifications(bucket string) s3op {
	return s3op{"remove notifications of " + bucket, func(ctx context.Context, c *minio.Client) error {
		return c.RemoveAllBucketNotification(ctx, bucket)
	}}
}

func listUploads(bucket string) s3op {
	return s3op{"list multipart uploads of " + bucket, func(ctx context.Context, c *minio.Client) error {
		for u := range c.ListIncompleteUploads(ctx, bucket, "", true) {
			return u.Err
		}
		return nil
	}}
}

func TestMinIOPoliciesGrantEachFunctionItsWorkAndNothingElse(t *testing.T) {
	// A fresh MinIO: setup must create everything, and other tests make
	// the buckets the policies name.
	endpoint := stack.FreshMinIO(t).Endpoint
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(2*time.Minute))
	defer cancel()

	// setup.json is enough for `imagepipe setup` on a fresh MinIO.
	setupClient := policyClient(t, endpoint, "minio/iam/setup.json")
	r, err := setup.ObjectStore(ctx, setupClient, setup.ObjectConfig{
		InputBucket: inputBucket, OutputBucket: outputBucket, NotifyTarget: minioserver.TargetID,
	})
	if err != nil {
		t.Fatalf("setup with minio/iam/setup.json: %v", err)
	}
	if !r.Changed() {
		t.Fatalf("setup changed nothing on a fresh MinIO: %v", r)
	}

	root := rootClient(t, endpoint)
	for _, o := range []s3op{
		put(inputBucket, "disks/win11.vhdx"), put(inputBucket, "errors/old.vhdx.error.json"),
		put(outputBucket, "disks/old.vhdx.raw"), makeBucket("elsewhere"), put("elsewhere", "secret"),
	} {
		if err := o.do(ctx, root); err != nil {
			t.Fatalf("root: %s: %v", o.name, err)
		}
	}

	tests := []struct {
		policy  string
		allowed []s3op
		denied  []s3op
	}{
		{
			policy: "convert.json",
			allowed: []s3op{
				get(inputBucket, "disks/win11.vhdx"), stat(inputBucket, "disks/win11.vhdx"),
				put(outputBucket, "disks/win11.vhdx.raw"), stat(outputBucket, "disks/win11.vhdx.raw"),
				copyObject(outputBucket, "disks/old.vhdx.raw", "disks/copy.vhdx.raw"),
				put(inputBucket, "errors/disks/win11.vhdx.error.json"), listUploads(outputBucket),
				tag(outputBucket, "disks/win11.vhdx.raw"), readTags(outputBucket, "disks/old.vhdx.raw"),
				copyTagged(outputBucket, "disks/old.vhdx.raw", "disks/tagged.vhdx.raw"),
			},
			denied: []s3op{
				put(inputBucket, "disks/forged.vhdx"), remove(inputBucket, "disks/win11.vhdx"),
				tag(inputBucket, "disks/win11.vhdx"),
				remove(outputBucket, "disks/old.vhdx.raw"), list(inputBucket), list(outputBucket),
				get("elsewhere", "secret"), makeBucket("more"), removeNotifications(inputBucket),
			},
		},
		{
			policy: "ingest.json",
			allowed: []s3op{
				list(inputBucket), stat(inputBucket, "disks/win11.vhdx"), headBucket(inputBucket),
				headBucket(outputBucket), getNotification(inputBucket), put(inputBucket, "imported/disk.vmdk"),
			},
			denied: []s3op{
				put(inputBucket, "errors/forged.error.json"), put(outputBucket, "disks/forged.raw"),
				get(outputBucket, "disks/old.vhdx.raw"), list(outputBucket), remove(inputBucket, "disks/win11.vhdx"),
				removeNotifications(inputBucket), get("elsewhere", "secret"),
			},
		},
		{
			policy: "uploader.json",
			allowed: []s3op{
				put(inputBucket, "disks/new.vhdx"), get(outputBucket, "disks/old.vhdx.raw"),
				get(inputBucket, "errors/old.vhdx.error.json"), list(inputBucket), list(outputBucket),
			},
			denied: []s3op{
				put(inputBucket, "errors/forged.error.json"), put(outputBucket, "disks/forged.raw"),
				get(inputBucket, "disks/win11.vhdx"), remove(inputBucket, "disks/new.vhdx"),
				remove(outputBucket, "disks/old.vhdx.raw"),
			},
		},
		{
			policy:  "setup.json",
			allowed: []s3op{headBucket(inputBucket), getNotification(inputBucket)},
			denied: []s3op{
				put(inputBucket, "disks/x.vhdx"), get(inputBucket, "disks/win11.vhdx"),
				get(outputBucket, "disks/old.vhdx.raw"), makeBucket("more"), list("elsewhere"),
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.policy, func(t *testing.T) {
			c := policyClient(t, endpoint, filepath.Join("minio/iam", tt.policy))
			for _, o := range tt.allowed {
				if err := o.do(ctx, c); err != nil {
					t.Errorf("%s: %v", o.name, err)
				}
			}
			for _, o := range tt.denied {
				err := o.do(ctx, c)
				if code := minio.ToErrorResponse(err).Code; code != "AccessDenied" {
					t.Errorf("%s: got %v, want AccessDenied", o.name, err)
				}
			}
		})
	}
}

func TestMinIOPolicyFilesAreWellFormed(t *testing.T) {
	files, _ := filepath.Glob("minio/iam/*.json")
	more, _ := filepath.Glob("minio/bucket-policies/*.json")
	files = append(files, more...)
	if len(files) < 5 {
		t.Fatalf("policy files: %v", files)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var p struct {
			Version   string
			Statement []struct {
				Sid, Effect string
				Principal   json.RawMessage
				Action      []string
				Resource    []string
			}
		}
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&p); err != nil {
			t.Errorf("%s: %v", f, err)
			continue
		}
		if p.Version != "2012-10-17" || len(p.Statement) == 0 {
			t.Errorf("%s: version %q, %d statements", f, p.Version, len(p.Statement))
		}
		isBucketPolicy := strings.Contains(f, "bucket-policies")
		for _, s := range p.Statement {
			if s.Sid == "" || (s.Effect != "Allow" && s.Effect != "Deny") || len(s.Action) == 0 || len(s.Resource) == 0 {
				t.Errorf("%s: statement %+v needs a Sid, an Effect, actions and resources", f, s)
			}
			if isBucketPolicy != (len(s.Principal) > 0) {
				t.Errorf("%s: statement %s: a bucket policy names a principal, an IAM policy does not", f, s.Sid)
			}
			for _, a := range s.Action {
				if a == "s3:*" || a == "*" {
					t.Errorf("%s: statement %s grants %s", f, s.Sid, a)
				}
			}
			for _, r := range s.Resource {
				if !strings.HasPrefix(r, "arn:aws:s3:::uploads") && !strings.HasPrefix(r, "arn:aws:s3:::images") {
					t.Errorf("%s: statement %s names %s, outside the imagepipe buckets", f, s.Sid, r)
				}
			}
		}
	}
}

func TestMinIOBucketPolicyLetsAnonymousClientsDownloadOutputsOnly(t *testing.T) {
	endpoint := sharedMinIO(t)
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(time.Minute))
	defer cancel()
	root := rootClient(t, endpoint)
	if _, err := setup.ObjectStore(ctx, root, setup.ObjectConfig{InputBucket: inputBucket, OutputBucket: outputBucket}); err != nil {
		t.Fatal(err)
	}
	for _, o := range []s3op{put(inputBucket, "anon/disk.vhdx"), put(outputBucket, "anon/disk.vhdx.raw")} {
		if err := o.do(ctx, root); err != nil {
			t.Fatal(err)
		}
	}
	policy, err := os.ReadFile("minio/bucket-policies/images-anonymous-download.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := root.SetBucketPolicy(ctx, outputBucket, string(policy)); err != nil {
		t.Fatalf("MinIO refuses the bucket policy: %v", err)
	}
	t.Cleanup(func() { _ = root.SetBucketPolicy(context.Background(), outputBucket, "") })

	base := "http://" + endpoint + "/"
	for _, tt := range []struct {
		method, path string
		want         int
	}{
		{http.MethodGet, outputBucket + "/anon/disk.vhdx.raw", http.StatusOK},
		{http.MethodGet, inputBucket + "/anon/disk.vhdx", http.StatusForbidden},
		{http.MethodPut, outputBucket + "/anon/forged.raw", http.StatusForbidden},
		{http.MethodDelete, outputBucket + "/anon/disk.vhdx.raw", http.StatusForbidden},
		{http.MethodGet, outputBucket + "?list-type=2", http.StatusForbidden},
	} {
		req, _ := http.NewRequestWithContext(ctx, tt.method, base+tt.path, strings.NewReader(""))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tt.want {
			t.Errorf("anonymous %s %s: %d, want %d", tt.method, tt.path, resp.StatusCode, tt.want)
		}
	}
}

func TestMinIOLifecycleFileIsTheRuleSetupKeeps(t *testing.T) {
	b, err := os.ReadFile("minio/lifecycle-errors.json")
	if err != nil {
		t.Fatal(err)
	}
	var cfg lifecycle.Configuration
	if err := json.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	want := setup.ErrorReportRule()
	if len(cfg.Rules) != 1 {
		t.Fatalf("%d rules, want 1", len(cfg.Rules))
	}
	got := cfg.Rules[0]
	if got.ID != want.ID || got.Status != want.Status || got.RuleFilter.Prefix != want.RuleFilter.Prefix || got.Expiration.Days != want.Expiration.Days {
		t.Errorf("lifecycle-errors.json has %+v, setup keeps %+v", got, want)
	}

	// MinIO takes it as `mc ilm import` would send it.
	endpoint := sharedMinIO(t)
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(time.Minute))
	defer cancel()
	root := rootClient(t, endpoint)
	bucket := fmt.Sprintf("lifecycle-check-%d", time.Now().UnixNano())
	if err := root.MakeBucket(ctx, bucket, minio.MakeBucketOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := root.SetBucketLifecycle(ctx, bucket, &cfg); err != nil {
		t.Fatalf("MinIO refuses the rule: %v", err)
	}
	back, err := root.GetBucketLifecycle(ctx, bucket)
	if err != nil || len(back.Rules) != 1 || back.Rules[0].Expiration.Days != setup.ErrorReportDays {
		t.Errorf("rule read back: %+v, %v", back, err)
	}
}

// readEnvFile reads KEY=VALUE lines, as systemd's EnvironmentFile and
// compose's env_file do for the simple files here.
func readEnvFile(t *testing.T, path string) map[string]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	env := map[string]string{}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok || k == "" || strings.ContainsAny(k, " \t") {
			t.Fatalf("%s:%d: not KEY=VALUE: %q", path, n, line)
		}
		if _, dup := env[k]; dup {
			t.Errorf("%s:%d: %s set twice", path, n, k)
		}
		env[k] = v
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return env
}

func TestMinIONotifyEnvMatchesTheNATSSide(t *testing.T) {
	env := readEnvFile(t, "minio/notify.env")
	want := map[string]string{
		"MINIO_NOTIFY_NATS_ENABLE_" + minioserver.TargetID:    "on",
		"MINIO_NOTIFY_NATS_SUBJECT_" + minioserver.TargetID:   events.SubjectS3Events,
		"MINIO_NOTIFY_NATS_JETSTREAM_" + minioserver.TargetID: "on",
		"MINIO_NOTIFY_NATS_USERNAME_" + minioserver.TargetID:  "minio",
		"MINIO_API_SYNC_EVENTS":                               "on",
	}
	for k, v := range want {
		if env[k] != v {
			t.Errorf("%s=%q, want %q", k, env[k], v)
		}
	}
	opts, err := LoadNATS(NATSNode{Config: "nats/single.conf", StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	pw, err := Password(opts, "minio")
	if err != nil {
		t.Fatal(err)
	}
	if os.Getenv(NATSPasswordVar("minio")) != pw {
		t.Errorf("accounts.conf does not take the minio user's password from %s", NATSPasswordVar("minio"))
	}
	if _, shipped := env["MINIO_NOTIFY_NATS_PASSWORD_"+minioserver.TargetID]; shipped {
		t.Error("notify.env holds the minio user's password: it goes beside the file, not in it")
	}
	if q := env["MINIO_NOTIFY_NATS_QUEUE_DIR_"+minioserver.TargetID]; !filepath.IsAbs(q) {
		t.Errorf("queue dir %q: MinIO wants an absolute path", q)
	}
	for k := range env {
		if strings.Contains(k, "NATS_JETSTREAM") && !strings.HasPrefix(k, "MINIO_NOTIFY_NATS_JETSTREAM_") {
			t.Errorf("%s: MinIO ignores it silently", k)
		}
	}
}

// TestMinIODeliversUploadsMadeWhileNATSWasDown uploads while the NATS
// server is down and shows the notification reaches S3_EVENTS once it is
// back: MinIO keeps it in its queue directory meanwhile. MinIO signs in as
// the minio user of accounts.conf, with the credentials of notify.env.
func TestMinIODeliversUploadsMadeWhileNATSWasDown(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(2*time.Minute))
	defer cancel()
	port, err := freeport.Pick()
	if err != nil {
		t.Fatal(err)
	}
	node := NATSNode{Config: "nats/single.conf", StoreDir: t.TempDir(), Port: port}
	startNode := func() func() {
		t.Helper()
		opts, err := LoadNATS(node)
		if err != nil {
			t.Fatal(err)
		}
		s, err := StartNATS(opts, nil)
		if err != nil {
			t.Fatal(err)
		}
		return sync.OnceFunc(s.Shutdown)
	}
	stopNATS := startNode()
	defer func() { stopNATS() }()

	opts, _ := LoadNATS(node)
	adminURL, err := ClientURL(opts, "admin", port)
	if err != nil {
		t.Fatal(err)
	}
	admin := connect(t, adminURL)
	js, _ := jetstream.New(admin.Conn)
	if _, err := setup.JetStream(ctx, js, setup.StreamConfig{}); err != nil {
		t.Fatal(err)
	}

	// minioserver wires the target itself; the credentials come from the
	// deployment's file, through the environment MinIO inherits.
	env := readEnvFile(t, "minio/notify.env")
	t.Setenv("MINIO_NOTIFY_NATS_USERNAME_PRIMARY", env["MINIO_NOTIFY_NATS_USERNAME_PRIMARY"])
	minioPW, err := Password(opts, env["MINIO_NOTIFY_NATS_USERNAME_PRIMARY"])
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("MINIO_NOTIFY_NATS_PASSWORD_PRIMARY", minioPW)
	ms, err := minioserver.Start(ctx, minioserver.Options{
		DataDir: filepath.Join(t.TempDir(), "minio"), AccessKey: rootUser, SecretKey: rootSecret,
		NATSAddr: fmt.Sprintf("127.0.0.1:%d", port), NATSSubject: events.SubjectS3Events,
		QueueEvents: true, // notify.env's queue directory, which this test is about
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ms.Stop()
	root := rootClient(t, ms.Endpoint)
	if _, err := setup.ObjectStore(ctx, root, setup.ObjectConfig{
		InputBucket: inputBucket, OutputBucket: outputBucket, NotifyTarget: minioserver.TargetID,
	}); err != nil {
		t.Fatal(err)
	}
	waitForKey := func(key string, within time.Duration) {
		t.Helper()
		deadline := time.Now().Add(stack.Scaled(within))
		for time.Now().Before(deadline) {
			if s, err := js.Stream(ctx, events.StreamS3Events); err == nil {
				msg, err := s.GetLastMsgForSubject(ctx, events.SubjectS3Events)
				if err == nil && bytes.Contains(msg.Data, []byte(key)) {
					return
				}
			}
			time.Sleep(200 * time.Millisecond)
		}
		t.Fatalf("no notification for %s in S3_EVENTS within %s", key, within)
	}
	if err := put(inputBucket, "before.vhdx").do(ctx, root); err != nil {
		t.Fatal(err)
	}
	waitForKey("before.vhdx", 10*time.Second)

	admin.Close()
	stopNATS()
	started := time.Now()
	if err := put(inputBucket, "during-outage.vhdx").do(ctx, root); err != nil {
		t.Fatalf("upload while NATS is down: %v", err)
	}
	t.Logf("upload while NATS was down took %s", time.Since(started).Round(time.Millisecond))

	stopNATS = startNode()
	back := time.Now()
	admin = connect(t, adminURL)
	js, _ = jetstream.New(admin.Conn)
	waitForKey("during-outage.vhdx", 60*time.Second)
	t.Logf("notification delivered %s after NATS came back", time.Since(back).Round(time.Millisecond))
}
