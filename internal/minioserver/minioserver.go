// Package minioserver runs a MinIO server as a child process with its bucket
// notification target wired to NATS JetStream, for `imagepipe dev` and for
// tests; StartCluster runs several as one distributed, erasure-coded
// deployment on loopback. MinIO is a separate AGPL program: it is
// executed, never imported.
package minioserver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"time"

	"github.com/imagepipe/imagepipe/internal/freeport"
)

// Version is the MinIO server pinned by the project (it has no semver tags).
const Version = "v0.0.0-20260212201848-7aac2a2c5b7c"

// InstallHint is the command that installs the pinned MinIO server.
const InstallHint = "go tool task deps (or: go install github.com/minio/minio@" + Version + ")"

// TargetID is the notification target's id; its ARN is
// arn:minio:sqs::PRIMARY:nats.
const TargetID = "PRIMARY"

// Options configures the child process.
type Options struct {
	Binary      string // default: found by FindBinary
	DataDir     string // object data; the notification queue lives beside it
	Addr        string // host:port; "" or port 0 picks a free loopback port
	ConsoleAddr string // "" disables the browser console
	AccessKey   string
	SecretKey   string // at least 8 characters
	NATSAddr    string // host:port of the NATS server for notifications
	NATSSubject string
	// QueueEvents keeps the notifications NATS does not take in a queue
	// directory beside DataDir and resends them when it is back: no
	// upload is lost to a NATS outage. The price is latency: MinIO then
	// sends every notification from that queue, on a 3-second tick.
	// Without it MinIO publishes before it answers the upload, and drops a
	// notification NATS refuses (ingest's reconcile finds that upload).
	QueueEvents bool
	// Compress turns on MinIO's transparent compression for raw outputs,
	// which are mostly zeros and compress to almost nothing.
	Compress bool
	Stdout   io.Writer // MinIO's own output; default discarded
}

// Server is a running MinIO child process.
type Server struct {
	Endpoint string // host:port
	cmd      *exec.Cmd
	done     chan struct{}
	waitErr  error
	stopOnce sync.Once
}

// Pid is the server's process id.
func (s *Server) Pid() int { return s.cmd.Process.Pid }

// FindBinary looks for minio on PATH, then in GOBIN and GOPATH/bin, where
// `go install` puts it.
func FindBinary() (string, error) {
	if p, err := exec.LookPath("minio"); err == nil {
		return p, nil
	}
	var dirs []string
	if d := os.Getenv("GOBIN"); d != "" {
		dirs = append(dirs, d)
	}
	if d := os.Getenv("GOPATH"); d != "" {
		dirs = append(dirs, filepath.Join(filepath.SplitList(d)[0], "bin"))
	}
	if home, err := os.UserHomeDir(); err == nil {
		dirs = append(dirs, filepath.Join(home, "go", "bin"))
	}
	for _, d := range dirs {
		p := filepath.Join(d, "minio")
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p, nil
		}
	}
	return "", fmt.Errorf("minio server binary not found on PATH or in GOPATH/bin; install it with: %s", InstallHint)
}

// Start launches MinIO and waits until /minio/health/cluster answers 200;
// live and ready answer before the server can take requests.
func Start(ctx context.Context, o Options) (*Server, error) {
	if err := o.check(); err != nil {
		return nil, err
	}
	if o.Addr == "" || o.Addr[len(o.Addr)-2:] == ":0" {
		addr, err := freeport.Addr()
		if err != nil {
			return nil, err
		}
		o.Addr = addr
	}
	dataDir, err := filepath.Abs(o.DataDir)
	if err != nil {
		return nil, fmt.Errorf("start minio: %w", err)
	}
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, fmt.Errorf("start minio: %w", err)
	}
	queueDir := ""
	if o.QueueEvents && o.NATSAddr != "" {
		queueDir = filepath.Join(filepath.Dir(dataDir), filepath.Base(dataDir)+"-events")
		if err := os.MkdirAll(queueDir, 0o700); err != nil {
			return nil, fmt.Errorf("start minio: %w", err)
		}
	}
	env := o.environ(queueDir)
	args := []string{"server", dataDir, "--address", o.Addr, "--quiet"}
	if o.ConsoleAddr != "" {
		args = append(args, "--console-address", o.ConsoleAddr)
	} else {
		env = append(env, "MINIO_BROWSER=off")
	}
	s, logs, err := spawn(o, "", args, env)
	if err != nil {
		return nil, err
	}
	if err := s.waitHealthy(ctx, 60*time.Second); err != nil {
		s.Stop()
		return nil, fmt.Errorf("start minio on %s: %w; its output:\n%s", o.Addr, err, logs.String())
	}
	return s, nil
}

// check fills in the binary and refuses what MinIO would refuse later,
// with less to go on.
func (o *Options) check() error {
	if o.Binary == "" {
		bin, err := FindBinary()
		if err != nil {
			return err
		}
		o.Binary = bin
	}
	if len(o.SecretKey) < 8 {
		return errors.New("start minio: the secret key needs at least 8 characters")
	}
	return nil
}

// environ is the server's environment: credentials, the NATS target (with
// its queue in queueDir, if set), compression.
func (o Options) environ(queueDir string) []string {
	env := append(os.Environ(),
		"MINIO_ROOT_USER="+o.AccessKey,
		"MINIO_ROOT_PASSWORD="+o.SecretKey,
		"MINIO_UPDATE=off",
		"MINIO_API_SYNC_EVENTS=on",
	)
	if o.NATSAddr != "" {
		env = append(env,
			"MINIO_NOTIFY_NATS_ENABLE_"+TargetID+"=on",
			"MINIO_NOTIFY_NATS_ADDRESS_"+TargetID+"="+o.NATSAddr,
			"MINIO_NOTIFY_NATS_SUBJECT_"+TargetID+"="+o.NATSSubject,
			// "jetstream", not the "nats_jetstream" some docs show, which
			// MinIO silently ignores.
			"MINIO_NOTIFY_NATS_JETSTREAM_"+TargetID+"=on",
		)
		if queueDir != "" {
			env = append(env, "MINIO_NOTIFY_NATS_QUEUE_DIR_"+TargetID+"="+queueDir)
		}
	}
	if o.Compress {
		env = append(env,
			"MINIO_COMPRESSION_ENABLE=on",
			"MINIO_COMPRESSION_EXTENSIONS=.raw",
		)
	}
	return env
}

// spawn starts the process in dir ("" for this process's own); the caller
// waits for it to be healthy.
func spawn(o Options, dir string, args, env []string) (*Server, *capped, error) {
	cmd := exec.Command(o.Binary, args...)
	cmd.Dir = dir
	cmd.Env = env
	cmd.SysProcAttr = sysProcAttr()
	logBuf := &capped{buf: &bytes.Buffer{}, max: 64 << 10}
	out := io.Writer(logBuf)
	if o.Stdout != nil {
		out = io.MultiWriter(out, o.Stdout)
	}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start minio: %w", err)
	}
	s := &Server{Endpoint: o.Addr, cmd: cmd, done: make(chan struct{})}
	go func() { s.waitErr = cmd.Wait(); close(s.done) }()
	return s, logBuf, nil
}

func (s *Server) waitHealthy(ctx context.Context, limit time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	url := "http://" + s.Endpoint + "/minio/health/cluster"
	client := &http.Client{Timeout: 2 * time.Second}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-s.done:
			return fmt.Errorf("exited early: %v", s.waitErr)
		case <-ctx.Done():
			return fmt.Errorf("not healthy: %w", ctx.Err())
		case <-tick.C:
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := client.Do(req)
		if err != nil {
			continue
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			return nil
		}
	}
}

// Stop terminates MinIO and its children and waits for it to exit.
func (s *Server) Stop() {
	s.stopOnce.Do(func() {
		terminate(s.cmd.Process)
		select {
		case <-s.done:
		case <-time.After(10 * time.Second):
			kill(s.cmd.Process)
			<-s.done
		}
	})
}

// Kill stops MinIO at once, as a crash would.
func (s *Server) Kill() {
	s.stopOnce.Do(func() {
		kill(s.cmd.Process)
		<-s.done
	})
}

// Done is closed when the process has exited.
func (s *Server) Done() <-chan struct{} { return s.done }

// capped keeps the first max bytes of MinIO's output for error messages.
type capped struct {
	mu  sync.Mutex
	buf *bytes.Buffer
	max int
}

func (c *capped) String() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.buf.String()
}

func (c *capped) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if room := c.max - c.buf.Len(); room > 0 {
		c.buf.Write(p[:min(room, len(p))])
	}
	return len(p), nil
}
