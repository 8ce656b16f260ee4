package stack

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/minioserver"
	"github.com/imagepipe/imagepipe/internal/natsserver"
)

// MinIO is the one MinIO server of a test package, as nats.go's tests
// run one server per package: a MinIO process takes seconds to start, so
// the package's tests share it and each keeps to buckets of its own.
// JetStream, which starts in milliseconds and whose stream names are
// fixed, is each test's own (natstest.Start).
type MinIO struct {
	Endpoint  string // host:port
	AccessKey string // the root user's
	SecretKey string
	// NATSAddr is the NATS server MinIO's notification target (TargetID
	// in internal/minioserver) publishes events.SubjectS3Events to: the
	// package's own, with no streams until a test makes them.
	NATSAddr string

	dir   string
	nats  *natsserver.Server
	minio *minioserver.Server
}

// Client is an S3 client signed in as the root user.
func (m *MinIO) Client() (*minio.Client, error) {
	return minio.New(m.Endpoint, &minio.Options{Creds: credentials.NewStaticV4(m.AccessKey, m.SecretKey, "")})
}

// packageMinIO is started by the first test that asks for it, or by Main
// for a package whose every test needs it, and stopped by Main.
var packageMinIO struct {
	once sync.Once
	m    *MinIO
	err  error
}

// Main runs a test package's tests and then stops the package's MinIO, if
// one started. Each before runs first, with the MinIO started, for a
// package whose tests all share a client; with none, MinIO starts on the
// first PackageMinIO call, so a run of tests that need none starts none.
// A TestMain is one line:
//
//	func TestMain(m *testing.M) { stack.Main(m) }
func Main(m *testing.M, before ...func(*MinIO) error) {
	os.Exit(runPackage(m, before))
}

func runPackage(m *testing.M, before []func(*MinIO) error) int {
	defer stopPackageMinIO()
	if len(before) > 0 {
		mi, err := startPackageMinIO()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		for _, f := range before {
			if err := f(mi); err != nil {
				fmt.Fprintln(os.Stderr, err)
				return 1
			}
		}
	}
	return m.Run()
}

// PackageMinIO is the package's MinIO, started on first use. The package's
// TestMain must be Main, which stops it.
func PackageMinIO(t testing.TB) *MinIO {
	t.Helper()
	mi, err := startPackageMinIO()
	if err != nil {
		t.Fatal(err)
	}
	return mi
}

// FreshMinIO is a MinIO of the test's own, stopped when it ends, for a
// test about what a MinIO nobody else has touched looks like.
func FreshMinIO(t testing.TB) *MinIO {
	t.Helper()
	m, err := startMinIOWithNATS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.stop)
	return m
}

func startPackageMinIO() (*MinIO, error) {
	p := &packageMinIO
	p.once.Do(func() {
		p.m, p.err = startMinIOWithNATS()
		if p.err != nil {
			p.err = fmt.Errorf("the test package's MinIO: %w", p.err)
		}
	})
	return p.m, p.err
}

func startMinIOWithNATS() (_ *MinIO, err error) {
	m := &MinIO{AccessKey: AccessKey, SecretKey: SecretKey}
	defer func() {
		if err != nil {
			m.stop()
		}
	}()
	if m.dir, err = os.MkdirTemp("", "imagepipe-test-minio-"); err != nil {
		return nil, err
	}
	if m.nats, err = natsserver.Start(natsserver.Options{Port: -1, StoreDir: filepath.Join(m.dir, "nats")}); err != nil {
		return nil, err
	}
	m.NATSAddr = m.nats.Addr()
	m.minio, err = minioserver.Start(context.Background(), minioserver.Options{
		DataDir: filepath.Join(m.dir, "minio"), AccessKey: m.AccessKey, SecretKey: m.SecretKey,
		NATSAddr: m.NATSAddr, NATSSubject: events.SubjectS3Events,
	})
	if err != nil {
		return nil, err
	}
	m.Endpoint = m.minio.Endpoint
	return m, nil
}

func stopPackageMinIO() {
	if m := packageMinIO.m; m != nil {
		m.stop()
	}
}

func (m *MinIO) stop() {
	if m.minio != nil {
		m.minio.Stop()
	}
	if m.nats != nil {
		m.nats.Shutdown()
	}
	if m.dir != "" {
		_ = os.RemoveAll(m.dir)
	}
}
