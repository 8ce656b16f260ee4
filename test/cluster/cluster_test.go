//go:build linux

package cluster

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/infra"
	"github.com/imagepipe/imagepipe/internal/minioserver"
	"github.com/imagepipe/imagepipe/test/stack"
)

// The reduced run, in `go tool task test`, converts 30 images; `go tool
// task chaos` sets CLUSTER_IMAGES for the full one. Each image is 8 to 16
// MiB of virtual disk with its own content, so that no two are duplicates
// and every output can be told from every other.
const (
	defaultImages = 30
	s3User        = "cluster-test"
	s3Secret      = "cluster-test-secret"
	inBucket      = "uploads"
	outBucket     = "images"
	ackWait       = 5 * time.Second
	// reconcileEvery is ingest's period here: an upload whose notification
	// a killed MinIO node took with it is converted within the run.
	reconcileEvery = 5 * time.Second
	// minioDown is how long the killed MinIO node stays down.
	minioDown = 3 * time.Second
)

// imageCount is CLUSTER_IMAGES, or the reduced run's 30.
func imageCount(t *testing.T) int {
	t.Helper()
	v := os.Getenv("CLUSTER_IMAGES")
	if v == "" {
		return defaultImages
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 12 {
		t.Fatalf("CLUSTER_IMAGES=%q: want a number of images, 12 or more (the faults wait for 10 READY)", v)
	}
	return n
}

var formats = []string{"qcow2", "vhdx", "vmdk"}

// TestClusterConvertsEveryImageExactlyOnceThroughCrashes runs the whole
// system as separate processes on a three-node NATS cluster and a
// four-node distributed MinIO: `imagepipe setup` with three replicas,
// ingest, notify and two convert replicas, each with its own NATS user
// from infra/nats/accounts.conf. While the images convert, one MinIO node
// is killed with SIGKILL and started again, one convert replica is killed
// with SIGKILL and started again, and the NATS node leading the job queue
// is stopped and brought back. Each image must still become READY once,
// be converted once, and have one result event and one notification.
func TestClusterConvertsEveryImageExactlyOnceThroughCrashes(t *testing.T) {
	if testing.Short() {
		t.Skip("the cluster test runs a cluster")
	}
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s not found; install it with: go tool task deps", tool)
		}
	}
	numImages := imageCount(t)
	// About 2.5 s an image on two shared cores with everything the run
	// starts, and never under the reduced run's two minutes.
	runTimeout := stack.Scaled(max(2*time.Minute, time.Duration(numImages)*2500*time.Millisecond))
	begin := time.Now()
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), runTimeout+stack.Scaled(3*time.Minute))
	defer cancel()

	// The binary and the images take the longest to make; the cluster
	// starts meanwhile.
	bin := filepath.Join(dir, "imagepipe")
	built := make(chan error, 1)
	go func() { built <- buildBinary(ctx, bin) }()
	type made struct {
		imgs []image
		err  error
	}
	images := make(chan made, 1)
	go func() {
		imgs, err := makeImages(filepath.Join(dir, "images"), numImages)
		images <- made{imgs, err}
	}()

	c := startCluster(t, dir)
	defer func() {
		if t.Failed() {
			if v := c.log.Violations(); len(v) > 0 {
				t.Logf("NATS refused these (is a right missing from infra/nats/accounts.conf?):\n%s", strings.Join(v, "\n"))
			}
		}
	}()

	// MinIO signs in to NATS as the minio user; each node's notification
	// target points at one NATS node and learns the others from it.
	minioPW := c.password(t, "minio")
	t.Setenv("MINIO_NOTIFY_NATS_USERNAME_"+minioserver.TargetID, "minio")
	t.Setenv("MINIO_NOTIFY_NATS_PASSWORD_"+minioserver.TargetID, minioPW)
	// Four nodes of one drive each, erasure-coded: any one may be lost.
	// Each node keeps its own notification queue, as infra/minio/notify.env
	// has it: a node's restart must lose no upload.
	mc, err := minioserver.StartCluster(ctx, minioserver.ClusterOptions{
		Options: minioserver.Options{
			DataDir: filepath.Join(dir, "minio"), AccessKey: s3User, SecretKey: s3Secret,
			NATSAddr: fmt.Sprintf("127.0.0.1:%d", c.ports[0]), NATSSubject: events.SubjectS3Events,
			QueueEvents: true,
		},
		Nodes: 4,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer mc.Stop()
	// A Service in front of a MinIO tenant spreads clients over its live
	// nodes. Here each client has a node of its own: ingest node 1,
	// convert node 2 and 3, the test's reads node 1. Node 4 takes a
	// share of the uploads and is the one killed, as a load balancer
	// would take it out of rotation.
	nodes := mc.Endpoints()
	s3 := s3Client(t, nodes[0])
	uploaders := make([]*minio.Client, len(nodes))
	for i, ep := range nodes {
		uploaders[i] = s3Client(t, ep)
	}

	if err := <-built; err != nil {
		<-images
		t.Fatal(err)
	}
	t.Logf("binary built, NATS cluster and distributed MinIO (%d nodes) up after %s", len(nodes), time.Since(begin).Round(time.Millisecond))
	envAt := func(s3Node int, user string, extra ...string) []string {
		e := []string{
			"PATH=" + os.Getenv("PATH"),
			"HOME=" + dir,
			"TMPDIR=" + dir,
			"IMAGEPIPE_NATS_URL=" + c.url(t, user),
			"IMAGEPIPE_S3_ENDPOINT=" + nodes[s3Node],
			"IMAGEPIPE_S3_ACCESS_KEY=" + s3User,
			"IMAGEPIPE_S3_SECRET_KEY=" + s3Secret,
			"IMAGEPIPE_STREAM_REPLICAS=3",
			"IMAGEPIPE_LOG_LEVEL=info",
		}
		return append(e, extra...)
	}
	env := func(user string, extra ...string) []string { return envAt(0, user, extra...) }

	// setup, twice: the second run must find nothing to do.
	for run := 1; run <= 2; run++ {
		cmd := exec.CommandContext(ctx, bin, "setup")
		cmd.Env = env("admin")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("imagepipe setup (run %d): %v\n%s", run, err, out)
		}
		if run == 1 && !strings.Contains(string(out), "created stream JOBS") {
			t.Fatalf("first setup did not create the streams:\n%s", out)
		}
		if run == 2 && !strings.Contains(string(out), "nothing changed") {
			t.Fatalf("second setup changed something:\n%s", out)
		}
	}
	admin := c.connect(t, "admin")
	js, err := jetstream.New(admin)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{events.StreamS3Events, events.StreamJobs, events.StreamResults, "KV_" + events.StatusBucket} {
		s, err := js.Stream(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		if r := s.CachedInfo().Config.Replicas; r != 3 {
			t.Fatalf("stream %s has %d replicas after setup, want 3", name, r)
		}
	}

	// Every state change of every image, from before the first upload.
	kv, err := js.KeyValue(ctx, events.StatusBucket)
	if err != nil {
		t.Fatal(err)
	}
	watch, err := kv.WatchAll(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = watch.Stop() }()

	logs := filepath.Join(dir, "logs")
	if err := os.MkdirAll(logs, 0o700); err != nil {
		t.Fatal(err)
	}
	// Scratch on a short path: each job's socket for qemu-img's output
	// lives there only where its path fits a socket address, and the
	// test name alone makes t.TempDir too long for that.
	scratchRoot, err := os.MkdirTemp("", "cluster-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(scratchRoot) })
	convertEnv := func(n int) []string {
		scratch := filepath.Join(scratchRoot, "scratch-"+strconv.Itoa(n))
		if err := os.MkdirAll(scratch, 0o700); err != nil {
			t.Fatal(err)
		}
		return envAt(n, "convert",
			"IMAGEPIPE_SCRATCH_DIR="+scratch,
			"IMAGEPIPE_ACK_WAIT="+ackWait.String(),
			"IMAGEPIPE_RETRY_BACKOFF=1s",
			"IMAGEPIPE_MAX_CONCURRENT_JOBS=2",
		)
	}
	// notify tells a webhook the test runs of every conversion, so that
	// what people are told is counted like the READY transitions.
	hook := newWebhookReceiver(t)
	procs := []*proc{
		startProc(t, bin, "ingest", "ingest", env("ingest", "IMAGEPIPE_RECONCILE_EVERY="+reconcileEvery.String()), logs),
		startProc(t, bin, "notify", "notify", env("notify", "IMAGEPIPE_WEBHOOK_URL="+hook.URL(), "IMAGEPIPE_NOTIFY_ON=success"), logs),
		startProc(t, bin, "convert-1", "convert", convertEnv(1), logs),
		startProc(t, bin, "convert-2", "convert", convertEnv(2), logs),
	}
	defer func() {
		for _, p := range procs {
			p.stop()
		}
		if t.Failed() {
			for _, p := range procs {
				p.tail(t)
			}
		}
	}()

	// Live progress is core NATS, stored nowhere: count it as it goes,
	// for the sizing figures (NATS messages per job).
	var progress atomic.Int64
	progressSub, err := admin.Subscribe(events.SubjectProgressPrefix+">", func(*nats.Msg) { progress.Add(1) })
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = progressSub.Unsubscribe() }()

	// Every function bound before the first upload: on a loaded machine
	// a consumer's creation across three replicas can take a while, and
	// the uploads would only add to it.
	waitBound(ctx, t, js, procs)

	m := <-images
	if m.err != nil {
		t.Fatal(m.err)
	}
	imgs := m.imgs
	want := map[string]image{}
	started := time.Now()
	// One uploader per node, as clients behind a load balancer: each
	// upload waits for its drives' writes on every node it spans.
	uploadErrs := make([]error, len(nodes))
	var uploading sync.WaitGroup
	for n := range nodes {
		uploading.Go(func() {
			for i := n; i < len(imgs); i += len(nodes) {
				if _, err := uploaders[n].FPutObject(ctx, inBucket, imgs[i].key, imgs[i].path, minio.PutObjectOptions{}); err != nil {
					uploadErrs[n] = fmt.Errorf("upload %s through MinIO node %d: %w", imgs[i].key, n+1, err)
					return
				}
			}
		})
	}
	uploading.Wait()
	if err := errors.Join(uploadErrs...); err != nil {
		t.Fatal(err)
	}
	for _, img := range imgs {
		want[img.key] = img
	}
	t.Logf("%d images uploaded in %s, spread over the %d MinIO nodes", len(imgs), time.Since(started).Round(time.Millisecond), len(nodes))

	// The last node goes down now, with conversions running and its share
	// of the notifications perhaps still in its queue (MinIO sends from
	// there on a 3-second tick), and comes back a moment later.
	var minioBack sync.WaitGroup
	defer minioBack.Wait()
	const killedNode = 3
	mc.KillNode(killedNode)
	minioKilled := time.Now()
	t.Logf("killed MinIO node %d with SIGKILL right after the last upload", killedNode+1)
	minioBack.Go(func() {
		time.Sleep(minioDown)
		if err := mc.StartNode(ctx, killedNode); err != nil {
			t.Errorf("MinIO node %d did not come back: %v", killedNode+1, err)
			return
		}
		t.Logf("MinIO node %d healthy again %s after the kill", killedNode+1, time.Since(minioKilled).Round(time.Millisecond))
	})

	// Follow the states; break things on the way.
	readyTransitions := map[string]int{}
	last := map[string]events.State{}
	outputs := map[string]map[string]bool{}
	var nodeBack sync.WaitGroup
	defer nodeBack.Wait()
	killedAt, stoppedAt := -1, -1
	deadline := time.After(runTimeout)
	// Jobs this small take tens of milliseconds: look for one in flight
	// between status updates too, or the kill may never find one.
	poll := time.NewTicker(5 * time.Millisecond)
	defer poll.Stop()
	for countReady(last) < numImages {
		select {
		case <-poll.C:
		case e := <-watch.Updates():
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue
			}
			var st events.Status
			if err := json.Unmarshal(e.Value(), &st); err != nil {
				t.Fatalf("status record %s: %v", e.Key(), err)
			}
			if st.State == events.StateFailed || st.State == events.StateDuplicate || st.State == events.StateCancelled {
				t.Fatalf("%s ended %s: %s: %s", st.Key, st.State, st.Phase, st.Message)
			}
			if st.State == events.StateReady {
				// Every READY write counts, one over another too: a watcher
				// sees each of them as the image finishing.
				readyTransitions[st.Key]++
				if outputs[st.Key] == nil {
					outputs[st.Key] = map[string]bool{}
				}
				outputs[st.Key][st.OutputBucket+"/"+st.OutputKey] = true
			}
			last[st.Key] = st.State
		case <-deadline:
			t.Fatalf("after %s only %d of %d images are READY: %v", runTimeout, countReady(last), numImages, last)
		}
		ready := countReady(last)
		if killedAt < 0 && ready >= 4 {
			// A replica with a job directory in its scratch space is in the
			// middle of a job it has not acknowledged: killing it loses
			// work that must go to another replica.
			if n := busyConvert(scratchRoot); n > 0 {
				killedAt = ready
				i := n + 1 // procs[2] is convert-1, procs[3] convert-2
				procs[i].kill()
				t.Logf("killed convert-%d with SIGKILL in the middle of a job, at %d READY", n, ready)
				procs[i] = startProc(t, bin, fmt.Sprintf("convert-%d-again", n), "convert", convertEnv(n), logs)
			}
		}
		if stoppedAt < 0 && ready >= 10 {
			stoppedAt = ready
			node := c.leaderOf(ctx, t, js, events.StreamJobs)
			c.stop(node)
			t.Logf("took NATS node %d, the JOBS leader, down at %d READY", node+1, ready)
			nodeBack.Go(func() {
				time.Sleep(3 * time.Second)
				c.start(t, node)
			})
		}
	}
	converted := time.Since(started)
	nodeBack.Wait()
	minioBack.Wait()
	if killedAt < 0 || stoppedAt < 0 {
		t.Fatalf("the faults never happened: no convert replica was caught mid-job (%d) or no node stopped (%d)", killedAt, stoppedAt)
	}

	// Settled: the node that came back has caught up, nothing is queued or
	// held by a consumer, so nothing can be delivered again.
	waitReplicasCurrent(ctx, t, js)
	waitQueueEmpty(ctx, t, js)

	for key := range want {
		if n := readyTransitions[key]; n != 1 {
			t.Errorf("%s became READY %d times, want exactly once", key, n)
		}
		if got := outputs[key]; len(got) != 1 || !got[outBucket+"/"+key+".raw"] {
			t.Errorf("%s: READY records name outputs %v, want only %s/%s.raw", key, got, outBucket, key)
		}
	}
	// A delivery that finds its job's output done reports it without
	// converting: only a conversion logs "converted". The replica killed
	// at a READY may die between recording it and logging the line, so a
	// key may show none; the results and outputs below prove it converted.
	conversions := conversionsLogged(t, logs)
	for key := range want {
		if n := conversions[key]; n > 1 {
			t.Errorf("%s was converted %d times, want once", key, n)
		}
	}
	checkResults(ctx, t, js, want)
	checkNotifyDeliveredOnce(ctx, t, js, hook, want)
	checkOutputs(ctx, t, s3, want)
	checkEveryUploadAnnounced(ctx, t, js, want, logs)
	logMessagesPerJob(ctx, t, js, len(want), progress.Load())
	// notify's memory of what it sent, and its watchdog lease, must survive
	// a node as the streams do.
	for _, bucket := range []string{events.NotifyLedgerBucket, events.WatchdogBucket} {
		s, err := js.Stream(ctx, "KV_"+bucket)
		if err != nil {
			t.Fatalf("notify's bucket %s: %v", bucket, err)
		}
		if r := s.CachedInfo().Config.Replicas; r != 3 {
			t.Errorf("notify's bucket %s has %d replicas, want 3 like the streams", bucket, r)
		}
	}
	if v := c.log.Violations(); len(v) > 0 {
		t.Errorf("NATS refused a function something it did (infra/nats/accounts.conf lacks a right):\n%s", strings.Join(v, "\n"))
	}
	t.Logf("%d images converted in %s through a SIGKILLed MinIO node, a SIGKILLed convert replica and a stopped NATS node; whole test %s",
		numImages, converted.Round(time.Millisecond), time.Since(begin).Round(time.Millisecond))
}

// logMessagesPerJob reports what the run cost NATS per image: messages
// stored in each stream (every one was made fresh for this run) and live
// progress messages, the README's sizing figures.
func logMessagesPerJob(ctx context.Context, t *testing.T, js jetstream.JetStream, jobs int, progress int64) {
	t.Helper()
	var b strings.Builder
	var msgs, bytes uint64
	for _, name := range []string{events.StreamS3Events, events.StreamJobs, events.StreamResults, "KV_" + events.StatusBucket} {
		s, err := js.Stream(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		st := s.CachedInfo().State
		// LastSeq counts every message ever stored: JOBS removes acked
		// jobs and the status bucket keeps one value per key.
		fmt.Fprintf(&b, " %s %.1f (%d B stored now),", name, float64(st.LastSeq)/float64(jobs), st.Bytes/uint64(jobs))
		msgs += st.LastSeq
		bytes += st.Bytes
	}
	t.Logf("NATS per image:%s progress %.1f (core NATS); %.1f stored messages and %.1f in all, %d B held per image now",
		b.String(), float64(progress)/float64(jobs), float64(msgs)/float64(jobs), (float64(msgs)+float64(progress))/float64(jobs), bytes/uint64(jobs))
}

// waitBound waits until ingest, convert and notify have each made their
// durable consumer and still run. A function that could not make its
// consumer in time exits with an error; like the systemd units
// (Restart=on-failure) and Kubernetes, the test starts it again, a few
// times at most.
func waitBound(ctx context.Context, t *testing.T, js jetstream.JetStream, procs []*proc) {
	t.Helper()
	wait := stack.Scaled(3 * time.Minute)
	deadline := time.Now().Add(wait)
	restarts := 0
	for {
		bound := 0
		for _, c := range []struct{ stream, durable string }{
			{events.StreamS3Events, "ingest"}, {events.StreamJobs, "convert"}, {events.StreamResults, "notify"},
		} {
			// A lookup whose request goes unanswered is asked again.
			cctx, cancel := context.WithTimeout(ctx, stack.Scaled(5*time.Second))
			if _, err := js.Consumer(cctx, c.stream, c.durable); err == nil {
				bound++
			}
			cancel()
		}
		running := 0
		for i, p := range procs {
			select {
			case <-p.done:
				restarts++
				if restarts > 2*len(procs) {
					p.tail(t)
					t.Fatalf("%s exited again at start", p.name)
				}
				t.Logf("%s exited at start (%s); starting it again, as its supervisor would", p.name, p.lastLine())
				procs[i] = p.again(t, restarts)
			default:
				running++
			}
		}
		if bound == 3 && running == len(procs) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s %d of 3 consumers made, %d of %d functions running", wait, bound, running, len(procs))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func s3Client(t *testing.T, endpoint string) *minio.Client {
	t.Helper()
	c, err := minio.New(endpoint, &minio.Options{Creds: credentials.NewStaticV4(s3User, s3Secret, "")})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// checkEveryUploadAnnounced asserts that no notification was lost: each
// upload has its MinIO notification in S3_EVENTS, a killed node's queue
// sending what it held once the node is back. It reports how many uploads
// ingest's reconcile queued itself, before their notification was handled
// or, had one been lost, instead of it.
func checkEveryUploadAnnounced(ctx context.Context, t *testing.T, js jetstream.JetStream, want map[string]image, logDir string) {
	t.Helper()
	// The restarted node sends its queue on its next tick; give it a
	// while before taking what is missing as lost.
	var announced map[string]int
	for deadline := time.Now().Add(stack.Scaled(30 * time.Second)); ; time.Sleep(time.Second) {
		announced = notifications(ctx, t, js)
		missing := 0
		for key := range want {
			if announced[key] == 0 {
				missing++
			}
		}
		if missing == 0 || time.Now().After(deadline) {
			break
		}
	}
	picked, passes := reconciledLogged(t, logDir)
	var unannounced, lost []string
	for key := range want {
		if announced[key] > 0 {
			continue
		}
		unannounced = append(unannounced, key)
		if !picked[key] {
			lost = append(lost, key)
		}
	}
	slices.Sort(unannounced)
	if len(unannounced) > 0 {
		slices.Sort(lost)
		t.Errorf("MinIO lost the notifications of %v; of those, reconcile did not find %v", unannounced, lost)
	}
	t.Logf("MinIO announced %d of %d uploads (%d never: %v); reconcile ran %d passes and queued %d uploads itself: %v",
		len(want)-len(unannounced), len(want), len(unannounced), unannounced, passes, len(picked), slices.Sorted(maps.Keys(picked)))
}

// notifications counts the object-created notifications in S3_EVENTS by
// input key.
func notifications(ctx context.Context, t *testing.T, js jetstream.JetStream) map[string]int {
	t.Helper()
	n := map[string]int{}
	for i, msg := range readStream(ctx, t, js, events.StreamS3Events) {
		note, err := events.ParseNotification(msg.Data())
		if err != nil {
			t.Fatalf("notification %d: %v", i+1, err)
		}
		for _, r := range note.Records {
			if r.Created() && r.Bucket == inBucket {
				n[r.Key]++
			}
		}
	}
	return n
}

// readStream reads every message a stream holds now, in order.
func readStream(ctx context.Context, t *testing.T, js jetstream.JetStream, stream string) []jetstream.Msg {
	t.Helper()
	s, err := js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	total := s.CachedInfo().State.Msgs
	cons, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	msgs := make([]jetstream.Msg, 0, total)
	for range total {
		var msg jetstream.Msg
		for try := 1; ; try++ {
			// A consumer just made may not be known on every node yet.
			msg, err = cons.Next(jetstream.FetchMaxWait(stack.Scaled(5 * time.Second)))
			if err == nil || !errors.Is(err, nats.ErrNoResponders) || try == 10 {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		if err != nil {
			t.Fatalf("read stream %s: %v", stream, err)
		}
		msgs = append(msgs, msg)
	}
	return msgs
}

// reconciledLogged reads ingest's logs for the uploads its reconcile
// passes queued or whose READY they restored, and counts the passes.
func reconciledLogged(t *testing.T, logDir string) (map[string]bool, int) {
	t.Helper()
	keys := map[string]bool{}
	lists := logged(t, logDir, "ingest*.log", "reconciled", "keys")
	for _, list := range lists {
		if list != "" && list != `""` {
			for key := range strings.SplitSeq(list, ",") {
				keys[key] = true
			}
		}
	}
	return keys, len(lists)
}

// conversionsLogged counts, per input key, the jobs the convert replicas
// logged as converted.
func conversionsLogged(t *testing.T, logDir string) map[string]int {
	t.Helper()
	n := map[string]int{}
	for _, key := range logged(t, logDir, "convert-*.log", "converted", "key") {
		if key != "" {
			n[key]++
		}
	}
	return n
}

// logged is stack.LogValues over every log in logDir that pattern matches.
func logged(t *testing.T, logDir, pattern, msg, attr string) []string {
	t.Helper()
	paths, err := filepath.Glob(filepath.Join(logDir, pattern))
	if err != nil {
		t.Fatal(err)
	}
	var values []string
	for _, path := range paths {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		values = append(values, stack.LogValues(b, msg, attr)...)
	}
	return values
}

func countReady(states map[string]events.State) int {
	n := 0
	for _, s := range states {
		if s == events.StateReady {
			n++
		}
	}
	return n
}

// busyConvert returns the number of a convert replica that has a job in
// its scratch directory now, or 0.
func busyConvert(dir string) int {
	for n := 1; n <= 2; n++ {
		entries, _ := os.ReadDir(filepath.Join(dir, "scratch-"+strconv.Itoa(n)))
		if len(entries) > 0 {
			return n
		}
	}
	return 0
}

// cluster is three NATS servers run from infra/nats/cluster-N.conf on
// loopback ports that stay theirs across a restart.
type cluster struct {
	nodes   []infra.NATSNode
	servers []*server.Server
	opts    *server.Options
	ports   []int
	log     *infra.ServerLog
	mu      sync.Mutex
}

func startCluster(t *testing.T, dir string) *cluster {
	t.Helper()
	c := &cluster{log: &infra.ServerLog{}}
	ports, cports, routes, err := infra.ClusterPorts(3)
	if err != nil {
		t.Fatal(err)
	}
	c.ports = ports
	for i := range 3 {
		c.nodes = append(c.nodes, infra.NATSNode{
			Config:   filepath.Join("..", "..", "infra", "nats", fmt.Sprintf("cluster-%d.conf", i+1)),
			StoreDir: filepath.Join(dir, fmt.Sprintf("nats-%d", i+1)),
			Port:     c.ports[i], ClusterPort: cports[i], Routes: routes,
		})
		c.servers = append(c.servers, nil)
		c.start(t, i)
	}
	t.Cleanup(func() {
		for i := range c.servers {
			c.stop(i)
		}
	})
	return c
}

func (c *cluster) start(t *testing.T, i int) {
	opts, err := infra.LoadNATS(c.nodes[i])
	if err != nil {
		t.Error(err)
		return
	}
	// Lame duck mode is how an operator takes a node down for a restart
	// or an upgrade; shortened here from its two minutes.
	opts.LameDuckDuration = 2 * time.Second
	opts.LameDuckGracePeriod = 500 * time.Millisecond
	s, err := infra.StartNATS(opts, c.log)
	if err != nil {
		t.Error(err)
		return
	}
	c.mu.Lock()
	c.servers[i], c.opts = s, opts
	c.mu.Unlock()
}

// stop takes node i down as `nats-server --signal ldm` does: it hands its
// stream and consumer leaderships to the other nodes, then closes its
// clients, which reconnect elsewhere.
func (c *cluster) stop(i int) {
	c.mu.Lock()
	s := c.servers[i]
	c.servers[i] = nil
	c.mu.Unlock()
	if s != nil {
		s.LameDuckShutdown()
		s.WaitForShutdown()
	}
}

func (c *cluster) password(t *testing.T, user string) string {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	pw, err := infra.Password(c.opts, user)
	if err != nil {
		t.Fatal(err)
	}
	return pw
}

// url lists every node, as IMAGEPIPE_NATS_URL does in production.
func (c *cluster) url(t *testing.T, user string) string {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	u, err := infra.ClientURL(c.opts, user, c.ports...)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func (c *cluster) connect(t *testing.T, user string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(c.url(t, user), nats.MaxReconnects(-1), nats.ReconnectWait(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// leaderOf is the index of the node leading a stream's replicas.
func (c *cluster) leaderOf(ctx context.Context, t *testing.T, js jetstream.JetStream, stream string) int {
	t.Helper()
	s, err := js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	leader := s.CachedInfo().Cluster.Leader
	for i := range c.nodes {
		if leader == fmt.Sprintf("nats-%d", i+1) {
			return i
		}
	}
	t.Fatalf("stream %s: leader %q is no node of ours", stream, leader)
	return -1
}

func buildBinary(ctx context.Context, out string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "github.com/imagepipe/imagepipe/cmd/imagepipe")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v\n%s", err, b)
	}
	return nil
}

type image struct {
	key, path, format string
	virtualSize       int64
	rawSHA256         string
}

// makeImages makes the test images with qemu-img and qemu-io, each with a
// pattern of its own, and what `qemu-img convert -O raw` makes of each.
func makeImages(dir string, numImages int) ([]image, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	imgs := make([]image, numImages)
	errs := make([]error, numImages)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 2)
	for i := range numImages {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			format := formats[i%len(formats)]
			mib := int64(8 + i%9)
			name := fmt.Sprintf("disk-%02d.%s", i, format)
			img := image{key: "batch/" + name, path: filepath.Join(dir, name), format: format, virtualSize: mib << 20}
			off := (int64(i) * 192 << 10) % ((mib - 2) << 20)
			steps := [][]string{
				{"qemu-img", "create", "-q", "-f", format, img.path, strconv.FormatInt(mib, 10) + "M"},
				{"qemu-io", "-f", format,
					"-c", fmt.Sprintf("write -P %d %d 1M", i+1, off),
					"-c", fmt.Sprintf("write -P %d %d 64k", 255-i, img.virtualSize-64<<10),
					img.path},
				{"qemu-img", "convert", "-f", format, "-O", "raw", img.path, img.path + ".raw"},
			}
			for _, s := range steps {
				if out, err := exec.Command(s[0], s[1:]...).CombinedOutput(); err != nil {
					errs[i] = fmt.Errorf("%s: %v\n%s", strings.Join(s, " "), err, out)
					return
				}
			}
			img.rawSHA256, errs[i] = fileSHA256(img.path + ".raw")
			_ = os.Remove(img.path + ".raw")
			imgs[i] = img
		})
	}
	wg.Wait()
	return imgs, errors.Join(errs...)
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// waitReplicasCurrent waits until every stream has a leader and all its
// replicas have caught up.
func waitReplicasCurrent(ctx context.Context, t *testing.T, js jetstream.JetStream) {
	t.Helper()
	deadline := time.Now().Add(stack.Scaled(30 * time.Second))
	for _, name := range []string{events.StreamS3Events, events.StreamJobs, events.StreamResults, "KV_" + events.StatusBucket} {
		for {
			s, err := js.Stream(ctx, name)
			if err == nil && s.CachedInfo().Cluster != nil && s.CachedInfo().Cluster.Leader != "" {
				current := 0
				for _, r := range s.CachedInfo().Cluster.Replicas {
					if r.Current {
						current++
					}
				}
				if current == 2 {
					break
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("stream %s has not caught up on every node: %v", name, err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
}

// waitQueueEmpty waits until the convert consumer holds nothing pending
// or unacknowledged.
func waitQueueEmpty(ctx context.Context, t *testing.T, js jetstream.JetStream) {
	t.Helper()
	deadline := time.Now().Add(stack.Scaled(20 * time.Second))
	for {
		cons, err := js.Consumer(ctx, events.StreamJobs, "convert")
		if err == nil {
			info := cons.CachedInfo()
			if info.NumPending == 0 && info.NumAckPending == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("convert queue not empty: %d pending, %d unacknowledged", info.NumPending, info.NumAckPending)
			}
		} else if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// checkResults reads RESULTS: one converted event per image with the
// sha256 a local qemu-img makes, and no failure that gave up.
func checkResults(ctx context.Context, t *testing.T, js jetstream.JetStream, want map[string]image) {
	t.Helper()
	converted := map[string][]events.Converted{}
	for _, msg := range readStream(ctx, t, js, events.StreamResults) {
		ev, err := events.Decode(msg.Data())
		if err != nil {
			t.Fatalf("result %s: %v", msg.Subject(), err)
		}
		switch msg.Subject() {
		case events.SubjectConverted:
			var c events.Converted
			if err := ev.DecodeData(events.TypeConverted, &c); err != nil {
				t.Fatal(err)
			}
			converted[c.InputKey] = append(converted[c.InputKey], c)
		case events.SubjectFailed:
			var f events.Failed
			if err := ev.DecodeData(events.TypeFailed, &f); err != nil {
				t.Fatal(err)
			}
			if !f.WillRetry {
				t.Errorf("%s failed for good in %s: %s", f.InputKey, f.Phase, f.Message)
			} else {
				t.Logf("%s failed attempt %d in %s and was retried: %s", f.InputKey, f.Attempt, f.Phase, f.Message)
			}
		}
	}
	redelivered := 0
	for _, cs := range converted {
		for _, c := range cs {
			if c.Attempt > 1 {
				redelivered++
			}
		}
	}
	if redelivered == 0 {
		t.Error("no job was delivered a second time, though a replica was killed in the middle of one")
	}
	t.Logf("%d jobs finished on a later delivery", redelivered)
	for key, img := range want {
		got := converted[key]
		if len(got) != 1 {
			t.Errorf("%s: %d converted events, want 1", key, len(got))
			continue
		}
		if got[0].SHA256 != img.rawSHA256 || got[0].OutputSize != img.virtualSize || got[0].InputFormat != img.format {
			t.Errorf("%s: converted %s %d bytes sha256 %s; qemu-img here makes %d bytes sha256 %s from %s",
				key, got[0].InputFormat, got[0].OutputSize, got[0].SHA256, img.virtualSize, img.rawSHA256, img.format)
		}
	}
}

// checkOutputs reads every output back: one per input, each the bytes a
// local qemu-img convert makes.
func checkOutputs(ctx context.Context, t *testing.T, s3 *minio.Client, want map[string]image) {
	t.Helper()
	var keys []string
	for o := range s3.ListObjects(ctx, outBucket, minio.ListObjectsOptions{Recursive: true}) {
		if o.Err != nil {
			t.Fatal(o.Err)
		}
		keys = append(keys, o.Key)
	}
	var wantKeys []string
	for key := range want {
		wantKeys = append(wantKeys, key+".raw")
	}
	slices.Sort(keys)
	slices.Sort(wantKeys)
	if !slices.Equal(keys, wantKeys) {
		t.Errorf("output bucket holds %d objects %v, want one per input %v", len(keys), keys, wantKeys)
	}
	for key, img := range want {
		obj, err := s3.GetObject(ctx, outBucket, key+".raw", minio.GetObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		n, err := io.Copy(h, obj)
		obj.Close()
		if err != nil {
			t.Fatalf("read %s.raw: %v", key, err)
		}
		if sum := hex.EncodeToString(h.Sum(nil)); sum != img.rawSHA256 || n != img.virtualSize {
			t.Errorf("%s.raw: %d bytes sha256 %s, want %d bytes sha256 %s", key, n, sum, img.virtualSize, img.rawSHA256)
		}
	}
}

// proc is one function running as its own OS process.
type proc struct {
	name, bin, function string
	env                 []string
	logDir              string
	cmd                 *exec.Cmd
	logPath             string
	done                chan struct{}
	once                sync.Once
}

// again starts the function anew, with a log of its own.
func (p *proc) again(t *testing.T, n int) *proc {
	t.Helper()
	return startProc(t, p.bin, fmt.Sprintf("%s-restart-%d", p.name, n), p.function, p.env, p.logDir)
}

// lastLine is the last line of the process's log, for saying why it
// exited.
func (p *proc) lastLine() string {
	b, _ := os.ReadFile(p.logPath)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return lines[len(lines)-1]
}

func startProc(t *testing.T, bin, name, function string, env []string, logDir string) *proc {
	t.Helper()
	logPath := filepath.Join(logDir, name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, function)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = f, f
	// Dies with the test, whatever happens to it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{name: name, bin: bin, function: function, env: env, logDir: logDir, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	return p
}

// kill ends the process at once, as a crash or the OOM killer would.
func (p *proc) kill() {
	p.once.Do(func() {
		_ = p.cmd.Process.Signal(syscall.SIGKILL)
		<-p.done
	})
}

// stop asks the process to drain and exit, as systemd and compose do.
func (p *proc) stop() {
	p.once.Do(func() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(stack.Scaled(10 * time.Second)):
			_ = p.cmd.Process.Signal(syscall.SIGKILL)
			<-p.done
		}
	})
}

func (p *proc) tail(t *testing.T) {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return
	}
	t.Logf("--- %s (last lines) ---\n%s", p.name, b[max(0, len(b)-6000):])
}
