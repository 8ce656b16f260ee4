package minioserver_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/imagepipe/imagepipe/internal/minioserver"
	"github.com/imagepipe/imagepipe/internal/natsserver"
	"github.com/imagepipe/imagepipe/test/stack"
)

const (
	user   = "cluster-user"
	secret = "cluster-secret"
)

func client(t *testing.T, endpoint string) *minio.Client {
	t.Helper()
	c, err := minio.New(endpoint, &minio.Options{Creds: credentials.NewStaticV4(user, secret, "")})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// putDuringOutage writes key through endpoint while a node is down. Until
// the others have marked it offline, MinIO may answer 503 ("Resource
// requested is unwritable, please reduce your request rate"): the write is
// tried again, each time with a fresh body, for as long as a client would
// wait out an outage. minio-go's own retries are off because they seek a
// body its transport may still be reading after an early answer.
func putDuringOutage(ctx context.Context, t *testing.T, endpoint, key string, body []byte) {
	t.Helper()
	c, err := minio.New(endpoint, &minio.Options{Creds: credentials.NewStaticV4(user, secret, ""), MaxRetries: 1})
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(stack.Scaled(30 * time.Second))
	for {
		_, err := c.PutObject(ctx, "bkt", key, bytes.NewReader(body), int64(len(body)), minio.PutObjectOptions{})
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("with node 4 down, a write failed for %s: %v", stack.Scaled(30*time.Second), err)
		}
		t.Logf("with node 4 down, a write failed, tried again: %v", err)
		time.Sleep(500 * time.Millisecond)
	}
}

func get(ctx context.Context, t *testing.T, c *minio.Client, key string) []byte {
	t.Helper()
	obj, err := c.GetObject(ctx, "bkt", key, minio.GetObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer obj.Close()
	b, err := io.ReadAll(obj)
	if err != nil {
		t.Fatalf("read %s through %s: %v", key, c.EndpointURL().Host, err)
	}
	return b
}

// awaitObject waits, up to a minute, until c finds key in bkt.
func awaitObject(ctx context.Context, t *testing.T, c *minio.Client, key string) {
	t.Helper()
	deadline := time.Now().Add(stack.Scaled(time.Minute))
	for {
		_, err := c.StatObject(ctx, "bkt", key, minio.StatObjectOptions{})
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never found %s: %v", c.EndpointURL().Host, key, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Four server processes make one deployment: an object written through one
// node is read through another, and with one node SIGKILLed the other
// three still read what it held a part of and take new writes, which the
// node serves once it is back.
func TestFourNodesAreOneDeploymentThatOutlivesANodeKilled(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(5*time.Minute))
	defer cancel()
	root := t.TempDir()
	ns, err := natsserver.Start(natsserver.Options{Port: -1, StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Shutdown()
	// With a notification target and its queue on disk: MinIO refuses to
	// form a deployment whose nodes differ in any MINIO_* setting, yet
	// each node needs a queue directory of its own.
	c, err := minioserver.StartCluster(ctx, minioserver.ClusterOptions{
		Options: minioserver.Options{
			DataDir: root, AccessKey: user, SecretKey: secret,
			NATSAddr: ns.Addr(), NATSSubject: "minioserver.test.events", QueueEvents: true,
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Stop()
	eps := c.Endpoints()
	if len(eps) != 4 {
		t.Fatalf("endpoints %v, want 4", eps)
	}
	// Each node has a process and a drive of its own.
	pids := map[int]bool{}
	for i := range eps {
		pids[c.Node(i).Pid()] = true
	}
	if len(pids) != 4 {
		t.Fatalf("4 nodes share processes: %v", pids)
	}

	first := client(t, eps[0])
	if err := first.MakeBucket(ctx, "bkt", minio.MakeBucketOptions{}); err != nil {
		t.Fatal(err)
	}
	before := make([]byte, 3<<20)
	_, _ = rand.Read(before)
	if _, err := first.PutObject(ctx, "bkt", "before", bytes.NewReader(before), int64(len(before)), minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := get(ctx, t, client(t, eps[1]), "before"); !bytes.Equal(got, before) {
		t.Fatal("node 2 reads other bytes than node 1 wrote")
	}

	c.KillNode(3)
	if c.Node(3) != nil {
		t.Fatal("a killed node still has a process")
	}
	second := client(t, eps[1])
	if got := get(ctx, t, second, "before"); !bytes.Equal(got, before) {
		t.Fatal("with node 4 down, node 2 reads other bytes")
	}
	during := make([]byte, 2<<20)
	_, _ = rand.Read(during)
	putDuringOutage(ctx, t, eps[1], "during", during)

	if err := c.StartNode(ctx, 3); err != nil {
		t.Fatal(err)
	}
	back := client(t, eps[3])
	// A node back from a kill answers /minio/health/cluster once a write
	// quorum is in reach, which can be before its links to every peer are
	// up; until then it may miss an object the others hold. Wait for it to
	// see the object at all, then hold it to the bytes.
	awaitObject(ctx, t, back, "during")
	if got := get(ctx, t, back, "during"); !bytes.Equal(got, during) {
		t.Fatal("node 4, back, reads other bytes than were written while it was down")
	}
	if got := get(ctx, t, back, "before"); !bytes.Equal(got, before) {
		t.Fatal("node 4, back, reads other bytes than were written before it went")
	}
	for i := range 4 {
		node := filepath.Join(root, fmt.Sprintf("node-%d", i+1))
		if _, err := os.Stat(filepath.Join(node, "drive-1", ".minio.sys")); err != nil {
			t.Errorf("node %d: no MinIO metadata in its own drive: %v", i+1, err)
		}
		if st, err := os.Stat(filepath.Join(node, "events")); err != nil || !st.IsDir() {
			t.Errorf("node %d: no notification queue directory of its own: %v", i+1, err)
		}
	}
}

// The package starts MinIO on every system imagepipe dev runs on; the
// process-group calls it makes exist only on some.
func TestBuildsForWindowsAndDarwin(t *testing.T) {
	for _, goos := range []string{"windows", "darwin"} {
		cmd := exec.Command("go", "build", ".")
		cmd.Env = append(os.Environ(), "GOOS="+goos, "GOARCH="+runtime.GOARCH, "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("GOOS=%s go build ./internal/minioserver: %v\n%s", goos, err, out)
		}
	}
}
