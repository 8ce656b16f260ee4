package infra

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nats.go/micro"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/fleet"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/orphan"
	"github.com/imagepipe/imagepipe/internal/setup"
)

func TestNATSConfigsPassTheServersOwnCheck(t *testing.T) {
	files, err := filepath.Glob("nats/*.conf")
	if err != nil || len(files) < 5 {
		t.Fatalf("configs in nats/: %v, %v", files, err)
	}
	if err := SetNATSSecrets(); err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if f == tlsExample {
			continue // its certificates are made by TestNATSTLSExample...
		}
		t.Run(filepath.Base(f), func(t *testing.T) {
			// What `nats-server -t -c FILE` does: any error or warning fails.
			opts, err := server.ProcessConfigFile(f)
			if err != nil {
				t.Fatal(err)
			}
			if f == "nats/accounts.conf" {
				return // included by the others, not run alone
			}
			// Monitoring shows every connection, subject and stream: it
			// stays on loopback unless an operator writes another address.
			if opts.HTTPPort == 0 || !loopbackHost(opts.HTTPHost) {
				t.Errorf("monitoring on %s:%d, want 127.0.0.1", opts.HTTPHost, opts.HTTPPort)
			}
			// One machine needs nothing beyond it; a cluster node is asked
			// for from other machines and says why in its comments.
			if opts.Cluster.Port == 0 && !loopbackHost(opts.Host) {
				t.Errorf("a single server listens for clients on %s, want 127.0.0.1", opts.Host)
			}
			if !opts.JetStream || opts.StoreDir == "" || opts.ServerName == "" {
				t.Errorf("jetstream %v, store dir %q, server name %q: want JetStream on, a store dir and a name", opts.JetStream, opts.StoreDir, opts.ServerName)
			}
			if len(opts.Users) == 0 {
				t.Error("no users: the accounts file is not included")
			}
			// What the server checks when it starts.
			o, err := LoadNATS(NATSNode{Config: f, StoreDir: t.TempDir(), ClusterPort: 1})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := server.NewServer(o); err != nil {
				t.Fatalf("server refuses the options: %v", err)
			}
		})
	}
}

func loopbackHost(h string) bool { return h == "127.0.0.1" || h == "::1" || h == "localhost" }

// TestNATSConfigsRefuseToStartWithoutTheirSecrets: no config holds a
// password; each takes it from the environment, and the server's own
// check fails, naming the variable, while one is unset.
func TestNATSConfigsRefuseToStartWithoutTheirSecrets(t *testing.T) {
	if err := SetNATSSecrets(); err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob("nats/*.conf")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(b), "change-me") {
			t.Errorf("%s ships a change-me password", f)
		}
	}
	vars := append([]string{NATSPasswordVar("cli"), NATSPasswordVar("operator"), NATSPasswordVar("admin")}, NATSRouteVars...)
	for _, v := range vars {
		t.Run(v, func(t *testing.T) {
			t.Setenv(v, "") // restores the value after the test
			if err := os.Unsetenv(v); err != nil {
				t.Fatal(err)
			}
			_, err := server.ProcessConfigFile("nats/cluster-1.conf")
			if err == nil || !strings.Contains(err.Error(), v) {
				t.Errorf("cluster-1.conf with %s unset: %v, want a refusal naming it", v, err)
			}
		})
	}
}

func TestNATSClusterConfigsNameEachOtherAndDifferOnlyInName(t *testing.T) {
	if err := SetNATSSecrets(); err != nil {
		t.Fatal(err)
	}
	var names []string
	for n := 1; n <= 3; n++ {
		o, err := server.ProcessConfigFile(fmt.Sprintf("nats/cluster-%d.conf", n))
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, o.ServerName)
		if o.Cluster.Name != "imagepipe" || o.Cluster.Username == "" || o.Cluster.Password == "" {
			t.Errorf("node %d: cluster %q, route user %q: want cluster imagepipe with route credentials", n, o.Cluster.Name, o.Cluster.Username)
		}
		var hosts []string
		for _, r := range o.Routes {
			hosts = append(hosts, r.Host)
			if r.User.Username() != o.Cluster.Username {
				t.Errorf("node %d: route %s without the route user", n, r.Redacted())
			}
		}
		if got := strings.Join(hosts, " "); got != "nats-1:6222 nats-2:6222 nats-3:6222" {
			t.Errorf("node %d routes to %s, want all three nodes", n, got)
		}
	}
	if strings.Join(names, " ") != "nats-1 nats-2 nats-3" {
		t.Errorf("server names %v", names)
	}
}

// cluster runs the three cluster configs on loopback.
type cluster struct {
	opts    []*server.Options
	servers []*server.Server
	ports   []int
}

// clusterPorts is ClusterPorts, failing the test if it fails.
func clusterPorts(t *testing.T, n int) (ports, cports []int, routes []string) {
	t.Helper()
	ports, cports, routes, err := ClusterPorts(n)
	if err != nil {
		t.Fatal(err)
	}
	return ports, cports, routes
}

// startNode starts a server with o, shut down when the test ends.
func startNode(t *testing.T, o *server.Options) *server.Server {
	t.Helper()
	s, err := StartNATS(o, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Shutdown)
	return s
}

func startCluster(t *testing.T) *cluster {
	t.Helper()
	c := &cluster{}
	var cports []int
	var routes []string
	c.ports, cports, routes = clusterPorts(t, 3)
	for i := range 3 {
		o, err := LoadNATS(NATSNode{
			Config: fmt.Sprintf("nats/cluster-%d.conf", i+1), StoreDir: t.TempDir(),
			Port: c.ports[i], ClusterPort: cports[i], Routes: routes,
		})
		if err != nil {
			t.Fatal(err)
		}
		c.opts, c.servers = append(c.opts, o), append(c.servers, startNode(t, o))
	}
	return c
}

func TestNATSClusterConfigsReplicateStreamsOnThreeNodes(t *testing.T) {
	c := startCluster(t)
	url, err := ClientURL(c.opts[0], "admin", c.ports...)
	if err != nil {
		t.Fatal(err)
	}
	nc := connect(t, url)
	js, _ := jetstream.New(nc.Conn)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r, err := setup.JetStream(ctx, js, setup.StreamConfig{Replicas: 3})
	if err != nil {
		t.Fatal(err)
	}
	if len(r) != 4 || r[0].Action != setup.Created {
		t.Fatalf("setup on the cluster: %v", r)
	}
	for _, name := range []string{events.StreamS3Events, events.StreamJobs, events.StreamResults, "KV_" + events.StatusBucket} {
		s, err := js.Stream(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		ci := s.CachedInfo().Cluster
		if ci == nil || ci.Name != "imagepipe" || ci.Leader == "" || len(ci.Replicas) != 2 {
			t.Errorf("stream %s: cluster info %+v, want a leader and two replicas in cluster imagepipe", name, ci)
		}
	}
}

// conn is a client of one user that remembers the permission errors the
// server sent it.
type conn struct {
	*nats.Conn
	errs chan error
}

func connect(t *testing.T, url string, opts ...nats.Option) *conn {
	t.Helper()
	errs := make(chan error, 64)
	nc, err := nats.Connect(url, append(opts, nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		select {
		case errs <- err:
		default:
		}
	}))...)
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	t.Cleanup(nc.Close)
	return &conn{Conn: nc, errs: errs}
}

// refused waits for the server to refuse op on subject.
func (c *conn) refused(t *testing.T, op, subject string) {
	t.Helper()
	want := fmt.Sprintf("permissions violation for %s to %q", op, subject)
	deadline := time.After(3 * time.Second)
	for {
		select {
		case err := <-c.errs:
			if strings.Contains(strings.ToLower(err.Error()), strings.ToLower(want)) {
				return
			}
		case <-deadline:
			t.Errorf("%s to %s was not refused", op, subject)
			return
		}
	}
}

// singleNode runs single.conf and provisions the streams as admin would.
func singleNode(t *testing.T) (opts *server.Options, port int, log *ServerLog) {
	t.Helper()
	opts, err := LoadNATS(NATSNode{Config: "nats/single.conf", StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	log = &ServerLog{}
	s, err := StartNATS(opts, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Shutdown)
	admin := userConn(t, opts, "admin")
	js, _ := jetstream.New(admin.Conn)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := setup.JetStream(ctx, js, setup.StreamConfig{}); err != nil {
		t.Fatal(err)
	}
	return opts, opts.Port, log
}

// userConn connects as user with the inbox prefix natsrt.Connect gives
// that role; MinIO's client keeps the default one.
func userConn(t *testing.T, opts *server.Options, user string) *conn {
	t.Helper()
	url, err := ClientURL(opts, user, opts.Port)
	if err != nil {
		t.Fatal(err)
	}
	if user == "minio" {
		return connect(t, url)
	}
	if user == "operator" {
		// The command-line tools use the cli prefix whoever signs in.
		user = "cli"
	}
	return connect(t, url, nats.CustomInboxPrefix(natsrt.InboxPrefix(user)))
}

func TestNATSUsersAreRefusedOutsideTheirRights(t *testing.T) {
	opts, port, _ := singleNode(t)
	tests := []struct {
		user      string
		publish   []string
		subscribe []string
	}{
		{
			user: "minio",
			publish: []string{
				events.SubjectConvertJob, events.SubjectConverted, "$KV.imagepipe_status.x",
				"$JS.API.STREAM.INFO.S3_EVENTS", "$JS.API.CONSUMER.MSG.NEXT.S3_EVENTS.ingest",
			},
			subscribe: []string{events.SubjectS3Events, "imagepipe.>", ">", "_INBOX_convert.>", "_INBOX_ingest.x"},
		},
		{
			user: "ingest",
			publish: []string{
				events.SubjectConverted, events.SubjectS3Events, events.SubjectStalled, "imagepipe.progress.j1",
				"$JS.API.STREAM.UPDATE.JOBS", "$JS.API.STREAM.DELETE.JOBS", "$JS.API.STREAM.PURGE.S3_EVENTS",
				"$JS.API.CONSUMER.CREATE.JOBS.convert.imagepipe.jobs.convert", "$JS.API.CONSUMER.MSG.NEXT.JOBS.convert",
				"$JS.ACK.JOBS.convert.1.1.1.1.1.0", "$KV.imagepipe_dedup.x", "imagepipe.ctl.convert.pause",
				"$JS.API.CONSUMER.MSG.NEXT.RESULTS.notify", "$JS.API.CONSUMER.DELETE.RESULTS.notify",
			},
			subscribe: []string{events.SubjectConvertJob, events.SubjectResults, "imagepipe.ctl.convert.pause", "$SRV.PING.imagepipe-convert",
				"_INBOX.>", "_INBOX_convert.>", "_INBOX_cli.x"},
		},
		{
			user: "convert",
			publish: []string{
				events.SubjectConvertJob, events.SubjectS3Events, events.SubjectStalled,
				"$JS.API.STREAM.CREATE.JOBS", "$JS.API.STREAM.DELETE.KV_imagepipe_status",
				"$JS.API.CONSUMER.MSG.NEXT.S3_EVENTS.ingest", "$JS.API.CONSUMER.CREATE.JOBS.other.imagepipe.jobs.convert",
				"$JS.API.CONSUMER.DELETE.JOBS.convert", "$KV.imagepipe_notify_ledger.x", "imagepipe.ctl.ingest.status",
			},
			subscribe: []string{events.SubjectS3Events, events.SubjectConvertJob, "imagepipe.ctl.ingest.status", "imagepipe.ctl.reconvert",
				"_INBOX.>", "_INBOX_ingest.>", "_INBOX_notify.x"},
		},
		{
			user: "notify",
			publish: []string{
				events.SubjectConvertJob, events.SubjectConverted, events.SubjectFailed, events.SubjectS3Events,
				"$KV.imagepipe_status.x", "$JS.API.CONSUMER.MSG.NEXT.JOBS.convert", "$JS.API.STREAM.DELETE.RESULTS",
				"$JS.API.STREAM.UPDATE.RESULTS", "$JS.API.STREAM.CREATE.KV_imagepipe_status",
			},
			subscribe: []string{events.SubjectConvertJob, events.SubjectResults, "imagepipe.ctl.convert.stop",
				"_INBOX.>", "_INBOX_convert.x", "_INBOX_cli.>"},
		},
		{
			user: "cli",
			publish: []string{
				events.SubjectConvertJob, events.SubjectS3Events, events.SubjectConverted, events.SubjectStalled,
				"$KV.imagepipe_status.x", "$JS.API.STREAM.DELETE.JOBS", "$JS.API.STREAM.PURGE.JOBS",
				"$JS.API.CONSUMER.MSG.NEXT.JOBS.convert", "$JS.API.CONSUMER.DELETE.JOBS.convert",
				"$JS.API.CONSUMER.CREATE.JOBS.convert.imagepipe.jobs.convert",
				"$JS.API.CONSUMER.CREATE.RESULTS.notify", "$JS.API.CONSUMER.MSG.NEXT.RESULTS.notify",
				// the operator's: a URL for ingest to fetch, and steering replicas
				events.SubjectImport, events.SubjectReconcile,
				"imagepipe.ctl.convert.pause", "imagepipe.ctl.convert.resume", "imagepipe.ctl.ingest.drain",
				"imagepipe.ctl.convert.stop", "imagepipe.ctl.notify.stop", "imagepipe.ctl.convert.cancel",
			},
			subscribe: []string{events.SubjectConvertJob, events.SubjectS3Events, "imagepipe.ctl.>", "$KV.imagepipe_status.>",
				"_INBOX_ingest.>", "_INBOX_convert.x"},
		},
		{
			user: "operator",
			publish: []string{
				events.SubjectConvertJob, events.SubjectS3Events, events.SubjectConverted, events.SubjectStalled,
				"$KV.imagepipe_status.x", "$JS.API.STREAM.DELETE.JOBS", "$JS.API.STREAM.PURGE.JOBS",
				"$JS.API.CONSUMER.MSG.NEXT.JOBS.convert", "$JS.API.CONSUMER.DELETE.JOBS.convert",
				"$JS.API.CONSUMER.CREATE.RESULTS.notify",
			},
			subscribe: []string{events.SubjectConvertJob, events.SubjectS3Events, "imagepipe.ctl.>", "$KV.imagepipe_status.>",
				"_INBOX_ingest.>", "_INBOX_convert.x"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.user, func(t *testing.T) {
			c := userConn(t, opts, tt.user)
			for _, subj := range tt.publish {
				if err := c.Publish(subj, []byte("{}")); err != nil {
					t.Fatal(err)
				}
				_ = c.Flush()
				c.refused(t, "publish", subj)
			}
			for _, subj := range tt.subscribe {
				if _, err := c.SubscribeSync(subj); err != nil {
					t.Fatal(err)
				}
				_ = c.Flush()
				c.refused(t, "subscription", subj)
			}
		})
	}
	t.Run("strangers", func(t *testing.T) {
		for _, url := range []string{
			fmt.Sprintf("nats://127.0.0.1:%d", port),
			fmt.Sprintf("nats://ingest:wrong@127.0.0.1:%d", port),
		} {
			if nc, err := nats.Connect(url); err == nil {
				nc.Close()
				t.Errorf("%s was let in", url)
			}
		}
	})
}

// TestNATSUsersCanDoTheirJobs walks one image through the pipeline with each
// user doing its own part, as the functions do it: MinIO's notification,
// ingest's job, convert's result and progress, notify's alert and ledger,
// and the command line's status, watch and control requests.
func TestNATSUsersCanDoTheirJobs(t *testing.T) {
	opts, _, log := singleNode(t)
	defer func() {
		if t.Failed() {
			t.Logf("server permission violations:\n%s", strings.Join(log.Violations(), "\n"))
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	js := func(c *conn) jetstream.JetStream {
		j, err := jetstream.New(c.Conn)
		if err != nil {
			t.Fatal(err)
		}
		return j
	}
	must := func(what string, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}

	// The command line watches every state change from the start.
	cli := userConn(t, opts, "cli")
	cliJS := js(cli)
	statusRO, err := cliJS.KeyValue(ctx, events.StatusBucket)
	must("cli: open status bucket", err)
	watch, err := statusRO.WatchAll(ctx)
	must("cli: watch status", err)
	defer func() { _ = watch.Stop() }()
	results, err := cli.SubscribeSync(events.SubjectResults)
	must("cli: follow results", err)
	progress, err := cli.SubscribeSync(events.SubjectProgressPrefix + ">")
	must("cli: follow progress", err)

	// MinIO publishes a notification and gets JetStream's ack.
	minio := userConn(t, opts, "minio")
	ack, err := js(minio).Publish(ctx, events.SubjectS3Events, []byte(`{"EventName":"s3:ObjectCreated:Put"}`))
	must("minio: publish notification", err)
	if ack.Stream != events.StreamS3Events {
		t.Fatalf("notification stored in %q", ack.Stream)
	}

	// ingest: start-up check, its consumer, the status record, the job.
	ingest := userConn(t, opts, "ingest")
	ingestJS := js(ingest)
	must("ingest: start-up stream check", setup.Streams(ctx, ingestJS, setup.StreamConfig{}))
	status, err := setup.StatusKV(ctx, ingestJS, 1)
	must("ingest: open status bucket", err)
	msg := nextMessage(ctx, t, ingestJS, events.StreamS3Events, "ingest", events.SubjectS3Events)
	if _, err := status.Get(ctx, "uploads.disk"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("ingest: read status: %v", err)
	}
	_, err = status.Put(ctx, "uploads.disk", []byte(`{"state":"QUEUED"}`))
	must("ingest: write status", err)
	// An upload whose job was lost long ago, for the watchdog and ctl
	// stats to count below.
	_, err = status.Put(ctx, "uploads.lost", []byte(`{"bucket":"uploads","key":"lost","job_id":"lost","state":"QUEUED"}`))
	must("ingest: write status", err)
	_, err = ingestJS.Publish(ctx, events.SubjectConvertJob, []byte(`{"job_id":"j1"}`), jetstream.WithMsgID("j1"))
	must("ingest: publish job", err)
	_, err = ingestJS.Publish(ctx, events.SubjectFailed, []byte(`{"phase":"intake"}`))
	must("ingest: publish an intake failure", err)
	must("ingest: ack", msg.DoubleAck(ctx))
	// One replica at a time reconciles, under a lease.
	lease, err := ingestJS.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "imagepipe_reconcile_lease", TTL: time.Minute})
	must("ingest: create reconcile lease", err)
	_, err = lease.Create(ctx, "reconcile", []byte("me"))
	must("ingest: take reconcile lease", err)
	// It answers re-convert requests from the command line, one replica
	// per request.
	intake, err := micro.AddService(ingest.Conn, micro.Config{Name: "imagepipe-intake", Version: "1.0.0", QueueGroup: "imagepipe-ingest"})
	must("ingest: register intake service", err)
	defer func() { _ = intake.Stop() }()
	must("ingest: serve reconvert", intake.AddEndpoint("reconvert",
		micro.HandlerFunc(func(r micro.Request) { _ = r.Respond([]byte(`{"job_id":"j2"}`)) }),
		micro.WithEndpointSubject("imagepipe.ctl.reconvert")))

	// convert: its consumer, progress, status, de-duplication bucket, result.
	convert := userConn(t, opts, "convert")
	convertJS := js(convert)
	must("convert: start-up stream check", setup.Streams(ctx, convertJS, setup.StreamConfig{}))
	job := nextMessage(ctx, t, convertJS, events.StreamJobs, "convert", events.SubjectConvertJob)
	must("convert: in progress", job.InProgress())
	must("convert: progress", convert.Publish(events.ProgressSubject("j1"), []byte(`{"percent":50}`)))
	convStatus, err := convertJS.KeyValue(ctx, events.StatusBucket)
	must("convert: open status bucket", err)
	_, err = convStatus.Put(ctx, "uploads.disk", []byte(`{"state":"READY"}`))
	must("convert: write status", err)
	dedup, err := convertJS.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "imagepipe_dedup", History: 1})
	must("convert: create its de-duplication bucket", err)
	_, err = dedup.Put(ctx, "etag-size.raw", []byte(`{}`))
	must("convert: write a de-duplication record", err)
	_, err = dedup.Get(ctx, "etag-size.raw")
	must("convert: read a de-duplication record", err)
	_, err = convertJS.Publish(ctx, events.SubjectConverted, []byte(`{"job_id":"j1"}`), jetstream.WithMsgID("converted/j1"))
	must("convert: publish result", err)
	must("convert: ack", job.DoubleAck(ctx))
	// Its replicas are a micro service that `nats micro ls` and ctl find.
	svc, err := micro.AddService(convert.Conn, micro.Config{Name: "imagepipe-convert", Version: "0.1.0"})
	must("convert: register control service", err)
	defer func() { _ = svc.Stop() }()
	must("convert: add control endpoint", svc.AddEndpoint("status",
		micro.HandlerFunc(func(r micro.Request) { _ = r.Respond([]byte(`{"state":"running"}`)) }),
		micro.WithEndpointSubject("imagepipe.ctl.convert.status"), micro.WithEndpointQueueGroupDisabled()))

	// notify: its consumer, ledger, watchdog lease and queue state, alert.
	notify := userConn(t, opts, "notify")
	notifyJS := js(notify)
	must("notify: start-up stream check", setup.Streams(ctx, notifyJS, setup.StreamConfig{}))
	res := nextMessage(ctx, t, notifyJS, events.StreamResults, "notify", events.SubjectResults)
	ledger, err := notifyJS.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "imagepipe_notify_ledger", TTL: time.Hour, History: 1})
	must("notify: create ledger", err)
	_, err = ledger.Get(ctx, "k")
	if !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("notify: read ledger: %v", err)
	}
	_, err = ledger.Put(ctx, "k", []byte("sent"))
	must("notify: write ledger", err)
	watchdog, err := notifyJS.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "imagepipe_notify_watchdog", TTL: 3 * time.Minute, History: 1})
	must("notify: create watchdog lease", err)
	rev, err := watchdog.Create(ctx, "lease", []byte("me"))
	must("notify: take lease", err)
	_, err = watchdog.Update(ctx, "lease", []byte("me"), rev)
	must("notify: renew lease", err)
	jobs, err := notifyJS.Stream(ctx, events.StreamJobs)
	must("notify: read the convert queue's stream", err)
	_, err = jobs.Consumer(ctx, "convert")
	must("notify: read the convert queue's consumer", err)
	statusStream, err := notifyJS.Stream(ctx, "KV_"+events.StatusBucket)
	must("notify: open the status bucket's stream", err)
	_, err = statusStream.GetLastMsgForSubject(ctx, "$KV."+events.StatusBucket+".>")
	must("notify: read the newest status record", err)
	if c, err := orphan.Find(ctx, notifyJS, time.Now(), time.Minute); err != nil || c.Uploads != 1 {
		t.Fatalf("notify: count uploads with no job: %+v, %v", c, err)
	}
	name, err := notifyJS.StreamNameBySubject(ctx, events.SubjectStalled)
	must("notify: find the alerts stream", err)
	_, err = notifyJS.Publish(ctx, events.SubjectStalled, []byte(`{"type":"stalled"}`), jetstream.WithMsgID("stalled.1"))
	must("notify: publish alert", err)
	alerts, err := notifyJS.Stream(ctx, name)
	must("notify: open alerts stream", err)
	_, err = alerts.GetLastMsgForSubject(ctx, events.SubjectStalled)
	must("notify: read last alert", err)
	must("notify: ack", res.DoubleAck(ctx))

	// The command line saw it all and steers the fleet.
	for _, sub := range []*nats.Subscription{results, progress} {
		if _, err := sub.NextMsg(5 * time.Second); err != nil {
			t.Errorf("cli: %s: %v", sub.Subject, err)
		}
	}
	seen := map[string]bool{}
	for len(seen) < 2 {
		select {
		case e := <-watch.Updates():
			if e != nil {
				seen[string(e.Value())] = true
			}
		case <-ctx.Done():
			t.Fatalf("cli: watched states %v", seen)
		}
	}
	_, err = statusRO.Get(ctx, "uploads.disk")
	must("cli: read status", err)
	_, err = cli.Request("imagepipe.ctl.reconvert", []byte(`{"bucket":"uploads","key":"disk"}`), 5*time.Second)
	must("cli: request reconvert", err)
	_, err = cli.Request("imagepipe.ctl.convert.status", nil, 5*time.Second)
	must("cli: control request", err)
	for _, name := range []string{"imagepipe-convert", "imagepipe-intake"} {
		_, err = cli.Request("$SRV.PING."+name, nil, 5*time.Second)
		must("cli: ping "+name, err)
	}
	// Fleet statistics come from reading the results stream.
	oc, err := cliJS.OrderedConsumer(ctx, events.StreamResults, jetstream.OrderedConsumerConfig{FilterSubjects: []string{events.SubjectResults}})
	must("cli: read results", err)
	_, err = oc.Next(jetstream.FetchMaxWait(5 * time.Second))
	must("cli: fetch a result", err)
	// ... up to the last result, past the alerts the stream also keeps.
	_, err = fleet.ReadResults(ctx, cliJS)
	must("cli: read the fleet's results (ctl stats)", err)
	_, err = cliJS.Stream(ctx, events.StreamJobs)
	must("cli: stream state", err)
	if c, err := orphan.Find(ctx, cliJS, time.Now(), time.Minute); err != nil || c.Uploads != 1 {
		t.Errorf("cli: count uploads with no job (ctl stats): %+v, %v", c, err)
	}
	if v := log.Violations(); len(v) != 0 {
		t.Errorf("the server refused something on the way:\n%s", strings.Join(v, "\n"))
	}
}

// nextMessage binds the function's durable consumer as its runtime does
// and fetches one message.
func nextMessage(ctx context.Context, t *testing.T, js jetstream.JetStream, stream, durable, filter string) jetstream.Msg {
	t.Helper()
	_, err := js.CreateOrUpdateConsumer(ctx, stream, jetstream.ConsumerConfig{
		Durable: durable, FilterSubject: filter, AckPolicy: jetstream.AckExplicitPolicy, AckWait: time.Minute,
	})
	if err != nil {
		t.Fatalf("%s: create consumer: %v", durable, err)
	}
	cons, err := js.Consumer(ctx, stream, durable)
	if err != nil {
		t.Fatalf("%s: bind consumer: %v", durable, err)
	}
	msg, err := cons.Next(jetstream.FetchMaxWait(10 * time.Second))
	if err != nil {
		t.Fatalf("%s: fetch: %v", durable, err)
	}
	return msg
}

// TestNATSConfigsSyncEveryWriteBeforeAcknowledging: every server config
// imagepipe ships (the single server, the three cluster nodes, which
// compose runs too, and the TLS example) makes JetStream write a message
// to disk before acknowledging it, as the README says. The server's
// default acknowledges first and flushes on a two-minute timer, so a
// machine's crash could lose a job or a status already acknowledged.
func TestNATSConfigsSyncEveryWriteBeforeAcknowledging(t *testing.T) {
	if err := SetNATSSecrets(); err != nil {
		t.Fatal(err)
	}
	files, err := filepath.Glob("nats/*.conf")
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, f := range files {
		if f == "nats/accounts.conf" {
			continue // included by the others; it has no jetstream block
		}
		t.Run(filepath.Base(f), func(t *testing.T) {
			conf := f
			if f == tlsExample {
				// The parser loads the certificates it names.
				conf = tlsConfig(t, makeCerts(t))
			}
			opts, err := server.ProcessConfigFile(conf)
			if err != nil {
				t.Fatal(err)
			}
			if !opts.JetStream || !opts.SyncAlways {
				t.Errorf("jetstream %v, sync always %v (interval %s): want `sync_interval: always` in the jetstream block",
					opts.JetStream, opts.SyncAlways, opts.SyncInterval)
			}
		})
		checked++
	}
	if checked != 5 {
		t.Errorf("checked %d server configs, want single, cluster-1..3 and the TLS example", checked)
	}
}

func TestServerLogTellsARepeatedViolationOnceWithItsCount(t *testing.T) {
	var l ServerLog
	for rid := range 3 {
		l.Errorf("%s - rid:%d - Route Error 'Authorization Violation'", "127.0.0.1:6222", 9000+rid)
	}
	l.Errorf("%s - cid:7 - \"v1.38.0:go:convert\" - Publish Violation - User \"convert\", Subject %q", "127.0.0.1:5000", "imagepipe.x")
	l.Noticef("%s - cid:8 - Violation in a notice is not recorded", "127.0.0.1:5000")
	want := []string{
		"127.0.0.1:6222 - rid:* - Route Error 'Authorization Violation' (3 times)",
		`127.0.0.1:5000 - cid:* - "v1.38.0:go:convert" - Publish Violation - User "convert", Subject "imagepipe.x"`,
	}
	if got := l.Violations(); !slices.Equal(got, want) {
		t.Fatalf("violations:\n%q\nwant:\n%q", got, want)
	}
}
