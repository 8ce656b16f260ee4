package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"sync"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/control"
	"github.com/imagepipe/imagepipe/internal/metrics"
	"github.com/imagepipe/imagepipe/internal/minioserver"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/natsserver"
	"github.com/imagepipe/imagepipe/internal/secrets"
	"github.com/imagepipe/imagepipe/internal/setup"
)

// devOptions configures the all-in-one stack.
type devOptions struct {
	DataDir     string
	NATSPort    int    // -1 picks a free port
	S3Addr      string // "" picks a free port
	ConsoleAddr string // "" disables the console
	Settings    settings
	MinIOOutput io.Writer
}

// devStack is NATS, MinIO and the three functions in one process tree.
type devStack struct {
	nats    *natsserver.Server
	minio   *minioserver.Server
	conns   []*nats.Conn
	workers map[string]*natsrt.Worker
	s       settings
	// controls answer `imagepipe ctl` for each function, as separate
	// replicas would.
	controls    map[string]*control.Service
	stopMetrics func()
}

// startDev brings the stack up. MinIO needs the stream before it can
// publish, so the order is: NATS, streams, MinIO, buckets, notification,
// functions.
func startDev(ctx context.Context, o devOptions, log *slog.Logger) (_ *devStack, err error) {
	if err := o.Settings.checkOutputLayout(); err != nil {
		return nil, err
	}
	if _, err := exec.LookPath("qemu-img"); err != nil {
		return nil, errors.New("qemu-img not found; install it with: go tool task deps (or: sudo apt-get install qemu-utils)")
	}
	bin, err := minioserver.FindBinary()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	d := &devStack{workers: map[string]*natsrt.Worker{}, controls: map[string]*control.Service{}, s: o.Settings}
	defer func() {
		if err != nil {
			d.Close()
		}
	}()

	d.nats, err = natsserver.Start(natsserver.Options{Port: o.NATSPort, StoreDir: filepath.Join(o.DataDir, "nats")})
	if err != nil {
		return nil, err
	}
	d.s.NATS.URL = d.nats.URL()
	nc, err := natsrt.Connect(ctx, d.s.NATS, "dev", log)
	if err != nil {
		return nil, err
	}
	d.conns = append(d.conns, nc)
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, err
	}
	r, err := setup.JetStream(ctx, js, d.s.Streams)
	if err != nil {
		return nil, err
	}
	logReport(log, r)
	// As setup does: the functions only create their buckets if missing,
	// and a changed setting must reach a data directory kept from before.
	if r, err = provisionFunctionKV(ctx, js, d.s); err != nil {
		return nil, err
	}
	logReport(log, r)

	d.minio, err = minioserver.Start(ctx, minioserver.Options{
		Binary:      bin,
		DataDir:     filepath.Join(o.DataDir, "minio"),
		Addr:        o.S3Addr,
		ConsoleAddr: o.ConsoleAddr,
		AccessKey:   d.s.S3.AccessKey,
		SecretKey:   d.s.S3.SecretKey,
		NATSAddr:    d.nats.Addr(),
		NATSSubject: events.SubjectS3Events,
		Compress:    true,
		// No notification queue: NATS runs in this process and MinIO is
		// its child, so the two are never apart, and a queue would hold
		// every upload's notification for up to 3 s.
		QueueEvents: false,
		Stdout:      o.MinIOOutput,
	})
	if err != nil {
		return nil, err
	}
	d.s.S3.Endpoint = d.minio.Endpoint
	d.s.Buckets.NotifyTarget = minioserver.TargetID
	if r, err = provisionObjects(ctx, d.s); err != nil {
		return nil, err
	}
	logReport(log, r)

	m := metrics.New(version, nc)
	for _, name := range events.Functions() {
		fnc, err := natsrt.Connect(ctx, d.s.NATS, name, log)
		if err != nil {
			return nil, err
		}
		d.conns = append(d.conns, fnc)
		w, err := startFunction(ctx, fnc, name, d.s, m, log.With("function", name))
		if err != nil {
			return nil, fmt.Errorf("start %s: %w", name, err)
		}
		d.workers[name] = w
		if d.controls[name], err = startControl(fnc, name, d.s, w, log.With("function", name)); err != nil {
			return nil, err
		}
	}
	if d.s.Metrics.Addr != "" {
		if d.stopMetrics, err = startMetrics(d.s, m, nc, d.workers, log); err != nil {
			return nil, err
		}
	}
	return d, nil
}

// Run runs the functions until ctx is cancelled and their in-flight work
// is done.
func (d *devStack) Run(ctx, jobCtx context.Context) {
	var wg sync.WaitGroup
	for _, w := range d.workers {
		wg.Go(func() { _ = w.Run(ctx, jobCtx) })
	}
	wg.Wait()
}

// Close stops MinIO and NATS.
func (d *devStack) Close() {
	if d.stopMetrics != nil {
		d.stopMetrics()
	}
	for _, nc := range d.conns {
		nc.Close()
	}
	if d.minio != nil {
		d.minio.Stop()
	}
	if d.nats != nil {
		d.nats.Shutdown()
	}
}

// devFlags are dev's flags.
type devFlags struct {
	dataDir     string
	natsPort    int
	s3Addr      string
	consoleAddr string
}

const devLong = `Runs the whole system on this machine: an embedded NATS JetStream server, a
MinIO server child process with the bucket notification wired to NATS, the
buckets, and all three functions, with notifications to the log. Data lives
under --data; reuse it to pick up where the last run stopped. Ctrl-C stops
everything cleanly; a second Ctrl-C aborts running jobs. Needs qemu-img and
the minio binary on PATH.`

func newDevCmd(e *cliEnv) *cobra.Command {
	var f devFlags
	c := &cobra.Command{
		Use:     "dev",
		Short:   "run the whole system on this machine",
		Long:    devLong,
		Example: "  imagepipe dev\n  imagepipe dev --data /tmp/imagepipe --nats-port 4223 --s3-addr 127.0.0.1:9100",
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := requireLinux("dev"); err != nil {
				return err
			}
			return runDev(cmd.Context(), e.jobCtx, f, e.stdout, e.log)
		},
	}
	fs := c.Flags()
	fs.StringVar(&f.dataDir, "data", "./.imagepipe", "where NATS and MinIO keep their data; reuse it to pick up where the last run stopped")
	fs.IntVar(&f.natsPort, "nats-port", 4222, "NATS client port on 127.0.0.1 (-1 picks a free one)")
	fs.StringVar(&f.s3Addr, "s3-addr", "127.0.0.1:9000", "MinIO S3 API address")
	fs.StringVar(&f.consoleAddr, "console-addr", "127.0.0.1:9001", "MinIO console address")
	return c
}

func runDev(ctx, jobCtx context.Context, f devFlags, stdout io.Writer, log *slog.Logger) error {
	s, err := loadSettings()
	if err != nil {
		return err
	}
	// The dev stack's MinIO is started with these credentials: MinIO's
	// well-known defaults, which are accepted on loopback only.
	if s.S3.AccessKey == "" {
		s.S3.AccessKey = secrets.MinIODefault
	}
	if s.S3.SecretKey == "" {
		s.S3.SecretKey = secrets.MinIODefault
	}
	if err := secrets.CheckS3(f.s3Addr, s.S3.AccessKey, s.S3.SecretKey); err != nil {
		return fmt.Errorf("--s3-addr %s: %w", f.s3Addr, err)
	}
	d, err := startDev(ctx, devOptions{
		DataDir: f.dataDir, NATSPort: f.natsPort, S3Addr: f.s3Addr, ConsoleAddr: f.consoleAddr, Settings: s,
	}, log)
	if err != nil {
		return err
	}
	defer d.Close()
	fmt.Fprintf(stdout, `
imagepipe dev is running (data in %s). Ctrl-C stops it; a second Ctrl-C aborts running jobs.

  NATS   %s
  S3     http://%s   (access key %s; console http://%s)

Upload an image, e.g. with the MinIO client:
  mc alias set local http://%s %s <secret>
  mc cp disk.vhdx local/%s/disks/disk.vhdx

Watch results and state:
  nats sub 'imagepipe.results.>'
  imagepipe watch
  imagepipe status %s/disks/disk.vhdx

The converted image appears as %s/disks/disk.vhdx.%s
`, f.dataDir, d.s.NATS.URL, d.s.S3.Endpoint, d.s.S3.AccessKey, f.consoleAddr,
		d.s.S3.Endpoint, d.s.S3.AccessKey, d.s.Ingest.InputBucket,
		d.s.Ingest.InputBucket, d.s.Convert.OutputBucket, d.s.Convert.OutputFormat)
	var svcs []*control.Service
	for _, name := range events.Functions() {
		svcs = append(svcs, d.controls[name])
	}
	defer logStatsOnSignal(d.conns[0], svcs, log)()
	d.Run(ctx, jobCtx)
	log.Info("imagepipe dev stopped")
	return nil
}
