package stack

import (
	"context"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/freeport"
	"github.com/imagepipe/imagepipe/internal/minioserver"
	"github.com/imagepipe/imagepipe/internal/natsserver"
)

// Buckets and credentials of every stack this package starts.
const (
	InputBucket  = "uploads"
	OutputBucket = "images"
	AccessKey    = "imagepipe-stack"
	SecretKey    = "imagepipe-stack-secret"
)

// Config describes a stack.
type Config struct {
	// Dir holds NATS's store, MinIO's data, scratch and logs.
	Dir string
	// Binary is an imagepipe executable, as Build makes.
	Binary string
	// ScratchDir is convert's IMAGEPIPE_SCRATCH_DIR; default Dir/scratch.
	ScratchDir string
	// Env is set for every function, FunctionEnv for one of them; both
	// are IMAGEPIPE_* settings and override this package's defaults.
	Env         map[string]string
	FunctionEnv map[string]map[string]string
	// Functions to start; default ingest, convert and notify.
	Functions []string
	// Compress turns on MinIO's transparent compression of .raw outputs,
	// as `imagepipe dev` does.
	Compress bool
	// QueueEvents gives MinIO's notification target a queue on disk, as
	// infra/minio/notify.env does, so uploads made while NATS is down are
	// announced when it is back. `imagepipe dev` runs without one.
	QueueEvents bool
}

// Stack is a running system.
type Stack struct {
	cfg   Config
	Procs map[string]*Proc

	mu       sync.Mutex
	nats     *natsserver.Server
	natsPort int
	minio    *minioserver.Server
	s3Addr   string
	minioLog *os.File

	NC   *nats.Conn
	JS   jetstream.JetStream
	S3   *minio.Client
	Core *minio.Core
}

// Build compiles the imagepipe command into dir and returns its path.
func Build(ctx context.Context, dir string) (string, error) {
	bin := filepath.Join(dir, "imagepipe")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/imagepipe/imagepipe/cmd/imagepipe")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build imagepipe: %v\n%s", err, out)
	}
	return bin, nil
}

// CheckTools reports the first external program the stack needs that is
// missing, with how to install it.
func CheckTools() error {
	for _, tool := range []string{"qemu-img", "qemu-io", "prlimit"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("%s not found; install it with: go tool task deps", tool)
		}
	}
	_, err := minioserver.FindBinary()
	return err
}

// Start brings the stack up: NATS, MinIO, `imagepipe setup`, then the
// functions. MinIO only publishes notifications once uploads arrive, by
// which time setup has made the stream.
func Start(ctx context.Context, cfg Config) (_ *Stack, err error) {
	if cfg.ScratchDir == "" {
		cfg.ScratchDir = filepath.Join(cfg.Dir, "scratch")
	}
	if cfg.Functions == nil {
		cfg.Functions = events.Functions()
	}
	for _, d := range []string{cfg.ScratchDir, filepath.Join(cfg.Dir, "logs")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	s := &Stack{cfg: cfg, Procs: map[string]*Proc{}}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()

	// RestartNATS brings the server back on its port: one the kernel hands
	// nobody else meanwhile.
	if s.natsPort, err = freeport.Pick(); err != nil {
		return nil, err
	}
	s.nats, err = natsserver.Start(natsserver.Options{Port: s.natsPort, StoreDir: filepath.Join(cfg.Dir, "nats")})
	if err != nil {
		return nil, err
	}

	s.minioLog, err = os.Create(filepath.Join(cfg.Dir, "logs", "minio.log"))
	if err != nil {
		return nil, err
	}
	if err := s.startMinIO(ctx); err != nil {
		return nil, err
	}

	s.NC, err = nats.Connect(s.nats.URL(), nats.Name("imagepipe-stack-observer"),
		nats.MaxReconnects(-1), nats.ReconnectWait(200*time.Millisecond))
	if err != nil {
		return nil, err
	}
	if s.JS, err = jetstream.New(s.NC); err != nil {
		return nil, err
	}
	s.S3, err = minio.New(s.s3Addr, &minio.Options{Creds: credentials.NewStaticV4(AccessKey, SecretKey, "")})
	if err != nil {
		return nil, err
	}
	s.Core = &minio.Core{Client: s.S3}

	setup := exec.CommandContext(ctx, cfg.Binary, "setup")
	setup.Env = s.env("setup")
	if out, err := setup.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("imagepipe setup: %v\n%s", err, out)
	}
	for _, name := range cfg.Functions {
		p := newProc(name, cfg.Binary, []string{name}, s.env(name), filepath.Join(cfg.Dir, "logs", name+".log"))
		if err := p.Start(); err != nil {
			return nil, err
		}
		s.Procs[name] = p
	}
	return s, nil
}

func (s *Stack) startMinIO(ctx context.Context) error {
	m, err := minioserver.Start(ctx, minioserver.Options{
		DataDir:     filepath.Join(s.cfg.Dir, "minio"),
		Addr:        s.s3Addr,
		AccessKey:   AccessKey,
		SecretKey:   SecretKey,
		NATSAddr:    s.nats.Addr(),
		NATSSubject: events.SubjectS3Events,
		Compress:    s.cfg.Compress,
		QueueEvents: s.cfg.QueueEvents,
		Stdout:      s.minioLog,
	})
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.minio, s.s3Addr = m, m.Endpoint
	s.mu.Unlock()
	return nil
}

// env is a function's whole environment: nothing of the test process's
// own IMAGEPIPE_* settings or proxies leaks in.
func (s *Stack) env(name string) []string {
	vars := map[string]string{
		"PATH":                          os.Getenv("PATH"),
		"HOME":                          os.Getenv("HOME"),
		"TMPDIR":                        filepath.Join(s.cfg.Dir, "tmp"),
		"IMAGEPIPE_NATS_URL":            fmt.Sprintf("nats://127.0.0.1:%d", s.natsPort),
		"IMAGEPIPE_S3_ENDPOINT":         s.s3Addr,
		"IMAGEPIPE_S3_ACCESS_KEY":       AccessKey,
		"IMAGEPIPE_S3_SECRET_KEY":       SecretKey,
		"IMAGEPIPE_INPUT_BUCKET":        InputBucket,
		"IMAGEPIPE_OUTPUT_BUCKET":       OutputBucket,
		"IMAGEPIPE_SCRATCH_DIR":         s.cfg.ScratchDir,
		"IMAGEPIPE_MINIO_NOTIFY_TARGET": minioserver.TargetID,
		"IMAGEPIPE_LOG_LEVEL":           "debug",
	}
	_ = os.MkdirAll(vars["TMPDIR"], 0o700)
	maps.Copy(vars, s.cfg.Env)
	maps.Copy(vars, s.cfg.FunctionEnv[name])
	out := make([]string, 0, len(vars))
	for _, k := range slices.Sorted(maps.Keys(vars)) {
		out = append(out, k+"="+vars[k])
	}
	return out
}

// AddReplica starts another process of a function, with extra settings.
func (s *Stack) AddReplica(name, id string, extra map[string]string) (*Proc, error) {
	env := s.env(name)
	for k, v := range extra {
		env = append(env, k+"="+v)
	}
	p := newProc(name+"-"+id, s.cfg.Binary, []string{name}, env, filepath.Join(s.cfg.Dir, "logs", name+"-"+id+".log"))
	if err := p.Start(); err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.Procs[p.Name] = p
	s.mu.Unlock()
	return p, nil
}

// MinIOPid is the running MinIO server's process id.
func (s *Stack) MinIOPid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.minio.Pid()
}

// ScratchDir is convert's scratch directory.
func (s *Stack) ScratchDir() string { return s.cfg.ScratchDir }

// S3Endpoint is MinIO's host:port, the same across restarts.
func (s *Stack) S3Endpoint() string { return s.s3Addr }

// Credentials are the stack's S3 access and secret keys.
func (s *Stack) Credentials() (string, string) { return AccessKey, SecretKey }

// NATSURL is the NATS client URL, the same across restarts.
func (s *Stack) NATSURL() string { return fmt.Sprintf("nats://127.0.0.1:%d", s.natsPort) }

// RestartNATS shuts the server down, keeps it down for down, and starts it
// again on the same port with the same JetStream store.
func (s *Stack) RestartNATS(down time.Duration) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nats.Shutdown()
	time.Sleep(down)
	var err error
	for range 20 {
		s.nats, err = natsserver.Start(natsserver.Options{Port: s.natsPort, StoreDir: filepath.Join(s.cfg.Dir, "nats")})
		if err == nil {
			return nil
		}
		time.Sleep(250 * time.Millisecond)
	}
	return fmt.Errorf("restart nats on port %d: %w", s.natsPort, err)
}

// RestartMinIO stops MinIO (with SIGKILL when crash is set, else SIGTERM),
// keeps it down for down, and starts it again on the same address and data.
func (s *Stack) RestartMinIO(ctx context.Context, crash bool, down time.Duration) error {
	s.mu.Lock()
	m := s.minio
	s.mu.Unlock()
	if crash {
		m.Kill()
	} else {
		m.Stop()
	}
	time.Sleep(down)
	var err error
	for range 10 {
		if err = s.startMinIO(ctx); err == nil {
			return nil
		}
		time.Sleep(500 * time.Millisecond)
	}
	return fmt.Errorf("restart minio on %s: %w", s.s3Addr, err)
}

// Close stops the functions (draining each for a few seconds), kills any
// qemu-img a killed replica left running in scratch, and stops MinIO and
// NATS.
func (s *Stack) Close() {
	var wg sync.WaitGroup
	for _, p := range s.Procs {
		wg.Go(func() { p.Stop(5 * time.Second) })
	}
	wg.Wait()
	for _, p := range ProcessesUsing(s.cfg.ScratchDir) {
		if proc, err := os.FindProcess(p.PID); err == nil {
			_ = proc.Kill()
		}
	}
	if s.NC != nil {
		s.NC.Close()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.minio != nil {
		s.minio.Stop()
	}
	if s.minioLog != nil {
		s.minioLog.Close()
	}
	if s.nats != nil {
		s.nats.Shutdown()
	}
}

// LogTail is the end of each process's log, for a failing test's output.
func (s *Stack) LogTail(max int) string {
	var b strings.Builder
	for _, name := range slices.Sorted(maps.Keys(s.Procs)) {
		data, err := os.ReadFile(s.Procs[name].LogPath())
		if err != nil {
			continue
		}
		fmt.Fprintf(&b, "--- %s (tail) ---\n%s\n", name, data[max0(len(data)-max):])
	}
	return b.String()
}

func max0(n int) int { return max(n, 0) }

// WaitConsumers waits until each function has bound its durable consumer,
// so that a measurement does not include a replica's start.
func (s *Stack) WaitConsumers(ctx context.Context) error {
	want := map[string]string{events.ConsumerIngest: events.StreamS3Events, events.ConsumerConvert: events.StreamJobs, events.ConsumerNotify: events.StreamResults}
	for _, name := range s.cfg.Functions {
		stream, ok := want[name]
		if !ok {
			continue
		}
		for {
			if _, err := s.JS.Consumer(ctx, stream, name); err == nil {
				break
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("%s consumer not bound: %w", name, ctx.Err())
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return nil
}
