package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/metrics"
	"github.com/imagepipe/imagepipe/internal/natsserver"
)

// cliRun is one command-line run under the test's own root context, for
// commands such as watch that only a signal, here a cancel, ends.
type cliRun struct {
	cancel         context.CancelFunc
	done           chan int
	stdout, stderr *lockedBuffer
}

func startCLI(t *testing.T, args ...string) *cliRun {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &cliRun{cancel: cancel, done: make(chan int, 1), stdout: &lockedBuffer{}, stderr: &lockedBuffer{}}
	e := &cliEnv{stdout: r.stdout, stderr: r.stderr, log: slog.New(slog.DiscardHandler), jobCtx: context.Background()}
	go func() { r.done <- execute(ctx, e, args) }()
	t.Cleanup(func() {
		cancel()
		<-r.done
	})
	return r
}

// exit waits for the command's exit code.
func (r *cliRun) exit(t *testing.T) int {
	t.Helper()
	select {
	case code := <-r.done:
		r.done <- code
		return code
	case <-time.After(scaled(3 * time.Minute)):
		t.Fatalf("command still running\nstdout: %s\nstderr: %s", r.stdout.String(), r.stderr.String())
	}
	return -1
}

// ended reports the exit code if the command has ended.
func (r *cliRun) ended() (int, bool) {
	select {
	case code := <-r.done:
		r.done <- code
		return code, true
	default:
		return 0, false
	}
}

// until waits for the command's stdout to hold want.
func (r *cliRun) until(t *testing.T, want string) {
	t.Helper()
	deadline := time.Now().Add(scaled(2 * time.Minute))
	for !strings.Contains(r.stdout.String(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("stdout never held %q:\n%s", want, r.stdout.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// cliPrefix is a folder of the uploads bucket that only this run of the
// test uses.
func cliPrefix(t *testing.T) string {
	t.Helper()
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return "e2e/cli/" + hex.EncodeToString(b) + "/"
}

// uniqueRaw is a raw disk of content no other upload has, so that it is
// converted, never a duplicate of an earlier run's.
func uniqueRaw(t *testing.T, name string) string {
	t.Helper()
	b := make([]byte, 1<<20)
	_, _ = rand.Read(b)
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestCLIStatusWaitFollowsAnUploadByAnyClientToItsEnd(t *testing.T) {
	stackEnv(t)
	prefix := cliPrefix(t)
	dir := t.TempDir()

	t.Run("READY exits 0", func(t *testing.T) {
		key := prefix + "good.raw"
		// Started before the object exists: it waits for the record to
		// appear, then for the end.
		w := startCLI(t, "status", "uploads/"+key, "--wait", "--timeout", "5m")
		upload(t, key, uniqueRaw(t, "good.raw"), false)
		if code := w.exit(t); code != 0 {
			t.Fatalf("status --wait exited %d\nstdout: %s\nstderr: %s", code, w.stdout.String(), w.stderr.String())
		}
		if out := w.stdout.String(); !strings.Contains(out, "READY") || !strings.Contains(out, "images/"+key+".raw") {
			t.Errorf("status --wait printed:\n%s", out)
		}
		// An image already converted is answered at once, as JSON too.
		r := imagepipe(t, "status", "uploads/"+key, "--json", "--wait")
		var st events.Status
		if r.code != 0 || json.Unmarshal([]byte(r.stdout), &st) != nil || st.State != events.StateReady {
			t.Errorf("status --wait --json of a converted image: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
	})

	t.Run("FAILED exits 1 with the reason", func(t *testing.T) {
		base := filepath.Join(dir, "base.qcow2")
		top := filepath.Join(dir, "top.qcow2")
		runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
		runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
		key := prefix + "backed.qcow2"
		w := startCLI(t, "status", "uploads/"+key, "--wait")
		upload(t, key, top, false)
		if code := w.exit(t); code != 1 {
			t.Fatalf("status --wait of a refused image exited %d\nstdout: %s\nstderr: %s", code, w.stdout.String(), w.stderr.String())
		}
		errLines := strings.Split(strings.TrimSpace(w.stderr.String()), "\n")
		last := errLines[len(errLines)-1]
		if !strings.HasPrefix(last, "imagepipe: uploads/"+key+" failed in ") || !strings.Contains(last, "backing file") {
			t.Errorf("status --wait did not say why it failed:\n%s", w.stderr.String())
		}
		if !strings.Contains(w.stdout.String(), "FAILED") {
			t.Errorf("status --wait printed:\n%s", w.stdout.String())
		}
	})

	t.Run("a new upload to the same key is followed, not the earlier one's record", func(t *testing.T) {
		key := prefix + "again.raw"
		res := subscribeResults(t)
		upload(t, key, uniqueRaw(t, "first.raw"), false)
		awaitConverted(t, res, key)
		// Ingest holds the new upload's notification until the wait has
		// begun, so the earlier upload's READY is what the key shows.
		ingest := e2e.stack.workers["ingest"]
		ingest.Pause()
		t.Cleanup(ingest.Resume)
		second := uniqueRaw(t, "second.raw")
		f, err := os.Open(second)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		info, err := e2e.s3.PutObject(context.Background(), "uploads", key, f, 1<<20, minio.PutObjectOptions{DisableMultipart: true})
		if err != nil {
			t.Fatal(err)
		}
		want := events.JobIDFor(events.ObjectIdentity("uploads", key, info.VersionID, info.ETag))
		watchers := statusWatchers(t)
		w := startCLI(t, "status", "uploads/"+key, "--wait", "--json", "--timeout", "5m")
		// The wait has looked at S3 and the record once it has connected;
		// a command that took the old READY would have ended by then.
		deadline := time.Now().Add(scaled(2 * time.Minute))
		for statusWatchers(t) <= watchers {
			if code, ended := w.ended(); ended {
				t.Fatalf("status --wait ended (exit %d) before the new upload was even noticed:\n%s%s", code, w.stdout.String(), w.stderr.String())
			}
			if time.Now().After(deadline) {
				t.Fatal("status --wait never watched the record")
			}
			time.Sleep(20 * time.Millisecond)
		}
		ingest.Resume()
		code := w.exit(t)
		r := cmdResult{code: code, stdout: w.stdout.String(), stderr: w.stderr.String()}
		var st events.Status
		if r.code != 0 || json.Unmarshal([]byte(r.stdout), &st) != nil || st.JobID != want || st.State != events.StateReady {
			t.Errorf("status --wait after a second upload: exit %d, record %+v, want job %s READY\n%s", r.code, st, want, r.stderr)
		}
	})

	t.Run("a timeout says so", func(t *testing.T) {
		key := prefix + "never-uploaded.raw"
		r := imagepipe(t, "status", "uploads/"+key, "--wait", "--timeout", "1s")
		if r.code != 1 || !strings.Contains(r.stderr, "timed out after 1s: no status record for uploads/"+key+" appeared") {
			t.Errorf("status --wait of an image never uploaded: exit %d\n%s%s", r.code, r.stdout, r.stderr)
		}
	})
}

func TestCLIWatchAndLsKeepToTheirPrefixAndStatusFindsAJobByID(t *testing.T) {
	stackEnv(t)
	prefix := cliPrefix(t)
	inKey, outKey := prefix+"in/a.raw", prefix+"out/b.raw"

	watch := startCLI(t, "watch", "uploads/"+prefix+"in/")
	keyOnly := startCLI(t, "watch", prefix+"in/", "--json")
	// The other image goes first: by the time the watchers print the
	// wanted image's end, they have seen every update of the other.
	res := subscribeResults(t)
	upload(t, outKey, uniqueRaw(t, "b.raw"), false)
	awaitConverted(t, res, outKey)
	upload(t, inKey, uniqueRaw(t, "a.raw"), false)
	awaitConverted(t, res, inKey)

	watch.until(t, "READY")
	keyOnly.until(t, `"state":"READY"`)
	// The result event may go out before the record says READY.
	if r := imagepipe(t, "status", "uploads/"+outKey, "--wait", "--timeout", "2m"); r.code != 0 {
		t.Fatalf("status --wait %s: exit %d\n%s%s", outKey, r.code, r.stdout, r.stderr)
	}
	for name, w := range map[string]*cliRun{"watch BUCKET/PREFIX": watch, "watch PREFIX --json": keyOnly} {
		out := w.stdout.String()
		if !strings.Contains(out, inKey) || strings.Contains(out, outKey) {
			t.Errorf("%s printed other images or missed its own:\n%s", name, out)
		}
	}

	for _, p := range []string{"uploads/" + prefix + "in/", prefix + "in/"} {
		r := imagepipe(t, "ls", "--prefix", p, "--json", "--limit", "0")
		var list []events.Status
		if r.code != 0 || json.Unmarshal([]byte(r.stdout), &list) != nil {
			t.Fatalf("ls --prefix %s: exit %d\n%s%s", p, r.code, r.stdout, r.stderr)
		}
		if len(list) != 1 || list[0].Key != inKey || list[0].State != events.StateReady {
			t.Errorf("ls --prefix %s listed %+v, want only %s", p, list, inKey)
		}
	}
	if r := imagepipe(t, "ls", "--prefix", prefix, "--state", "ready"); r.code != 0 || !strings.Contains(r.stdout, inKey) || !strings.Contains(r.stdout, outKey) {
		t.Errorf("ls --prefix %s --state ready: exit %d\n%s%s", prefix, r.code, r.stdout, r.stderr)
	}

	job := statusOf(t, "uploads", outKey).JobID
	r := imagepipe(t, "status", "--job", job, "--json")
	var st events.Status
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &st) != nil || st.Key != outKey || st.JobID != job {
		t.Errorf("status --job %s: exit %d\n%s%s", job, r.code, r.stdout, r.stderr)
	}
	if r := imagepipe(t, "status", "--job", "00000000-0000-0000-0000-000000000000"); r.code != 1 || !strings.Contains(r.stderr, "no image has job 00000000-0000-0000-0000-000000000000") {
		t.Errorf("status --job of an unknown job: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}

func TestCLIHealthcheckAsksTheFunctionsReadyz(t *testing.T) {
	// The metrics listener of the stack's functions, wired as a function
	// process wires its own, on an address of this test's.
	s := e2e.stack.s
	addr := freeAddr(t)
	s.Metrics.Addr = addr
	stop, err := startMetrics(s, metrics.New(version, e2e.nc), e2e.nc, e2e.stack.workers, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(addr)
	// Listening on every interface, as in a container, is asked on
	// loopback.
	t.Setenv("IMAGEPIPE_METRICS_ADDR", ":"+port)
	if r := imagepipe(t, "healthcheck"); r.code != 0 || strings.TrimSpace(r.stdout) != "ok" || r.stderr != "" {
		t.Errorf("healthcheck of a ready stack: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	stop()
	if r := imagepipe(t, "healthcheck"); r.code != 1 || !strings.Contains(r.stderr, "nothing answered at http://127.0.0.1:"+port+"/readyz") {
		t.Errorf("healthcheck with nothing listening: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}

	// A function that is not ready answers 503 with its reasons.
	notReady := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprintln(w, "nats: not connected")
	}))
	defer notReady.Close()
	if r := imagepipe(t, "healthcheck", "--url", notReady.URL+"/readyz"); r.code != 1 || !strings.Contains(r.stderr, "503 Service Unavailable: nats: not connected") {
		t.Errorf("healthcheck of a function that is not ready: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
}

func TestCLIInspectJudgesCompressedImagesAndPrintsTheVerdictOnce(t *testing.T) {
	dir := t.TempDir()
	qcow2 := makeImage(t, dir, "disk.qcow2", "qcow2", "write -P 0x61 0 1M")
	vmdk := makeImage(t, dir, "disk.vmdk", "vmdk", "write -P 0x62 2M 1M")
	for _, path := range []string{compressFile(t, qcow2, "xz"), compressFile(t, vmdk, "gz")} {
		r := imagepipe(t, "inspect", path)
		if r.code != 0 || r.stderr != "" || strings.Count(r.stdout, "verdict") != 1 || !strings.Contains(r.stdout, "accepted") ||
			!strings.Contains(r.stdout, "virtual size  64 MiB") {
			t.Errorf("inspect %s: exit %d\nstdout: %s\nstderr: %s", filepath.Base(path), r.code, r.stdout, r.stderr)
		}
	}

	// A refused image: the verdict once, on stdout, with its virtual
	// size; exit 1 and nothing on stderr.
	base := filepath.Join(dir, "base.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	for _, path := range []string{top, compressFile(t, top, "xz")} {
		r := imagepipe(t, "inspect", path)
		if r.code != 1 || r.stderr != "" || strings.Count(r.stdout, "refused by rule backing-file") != 1 ||
			!strings.Contains(r.stdout, "virtual size  16 MiB") {
			t.Errorf("inspect %s: exit %d\nstdout: %s\nstderr: %s", filepath.Base(path), r.code, r.stdout, r.stderr)
		}
	}
}

// TestCLIDedupPruneRefusesANATSWithoutImagepipe: on a NATS imagepipe was
// never set up on, prune names the missing bucket and creates nothing.
func TestCLIDedupPruneRefusesANATSWithoutImagepipe(t *testing.T) {
	bare := newBareNATS(t)
	t.Setenv("IMAGEPIPE_NATS_URL", bare.url)
	r := imagepipe(t, "dedup", "prune")
	if r.code != 1 || !strings.Contains(r.stderr, "imagepipe_dedup does not exist") || !strings.Contains(r.stderr, "run imagepipe setup") || r.stdout != "" {
		t.Errorf("dedup prune on a bare NATS: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
	if names := bare.kvBuckets(t); len(names) != 0 {
		t.Errorf("dedup prune created key-value buckets %v", names)
	}
}

// TestCLIUploadToAnUnreachableS3NamesTheEndpoint: nothing listens at the
// endpoint, and the error says so, naming it.
func TestCLIUploadToAnUnreachableS3NamesTheEndpoint(t *testing.T) {
	stackEnv(t)
	dead := freeAddr(t)
	t.Setenv("IMAGEPIPE_S3_ENDPOINT", dead)
	img := uniqueRaw(t, "disk.raw")
	r := imagepipe(t, "upload", img, "uploads/"+cliPrefix(t)+"disk.raw")
	if r.code != 1 || !strings.Contains(r.stderr, "nothing answered at S3 endpoint http://"+dead) ||
		strings.Contains(r.stderr, "incomplete upload") {
		t.Errorf("upload to a dead S3: exit %d\nstderr: %s", r.code, r.stderr)
	}
}

// Keys S3 refuses, or none at all (the AWS credential chain then finds
// nothing and the request goes unsigned), are named as the settings to fix,
// not reported as a bare "Access Denied" from deep inside the upload.
func TestCLIUploadWithKeysS3RefusesNamesTheKeySettings(t *testing.T) {
	img := uniqueRaw(t, "disk.raw")
	for name, keys := range map[string][2]string{"wrong secret": {"minioadmin", "not-the-secret"}, "no keys": {"", ""}} {
		stackEnv(t)
		t.Setenv("IMAGEPIPE_S3_ACCESS_KEY", keys[0])
		t.Setenv("IMAGEPIPE_S3_SECRET_KEY", keys[1])
		for _, v := range []string{"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} {
			t.Setenv(v, "")
		}
		t.Setenv("HOME", t.TempDir()) // no ~/.aws/credentials
		t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
		r := imagepipe(t, "upload", img, "uploads/"+cliPrefix(t)+"disk.raw")
		if r.code != 1 || !strings.Contains(r.stderr, `refused access to bucket "uploads"`) ||
			!strings.Contains(r.stderr, "IMAGEPIPE_S3_ACCESS_KEY and IMAGEPIPE_S3_SECRET_KEY") {
			t.Errorf("%s: upload exited %d\nstderr: %s", name, r.code, r.stderr)
		}
	}
}

// statusWatchers counts the consumers on the status bucket's stream: each
// watch of a record is one.
func statusWatchers(t *testing.T) int {
	t.Helper()
	s, err := e2e.js.Stream(context.Background(), "KV_"+events.StatusBucket)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Consumers
}

// bareNATS is a JetStream server imagepipe was never set up on.
type bareNATS struct {
	url string
	srv *natsserver.Server
}

func newBareNATS(t *testing.T) *bareNATS {
	t.Helper()
	srv, err := natsserver.Start(natsserver.Options{Port: -1, StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Shutdown)
	return &bareNATS{url: srv.URL(), srv: srv}
}

// kvBuckets names the key-value buckets the server holds.
func (b *bareNATS) kvBuckets(t *testing.T) []string {
	t.Helper()
	nc, err := nats.Connect(b.url)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	names := js.KeyValueStoreNames(context.Background())
	var out []string
	for n := range names.Name() {
		out = append(out, n)
	}
	if err := names.Error(); err != nil {
		t.Fatal(err)
	}
	return out
}
