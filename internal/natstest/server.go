package natstest

import (
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/imagepipe/imagepipe/test/stack"
)

// StartServer runs a server of the test's own with opts, for a test about
// what the code does with a server that lacks something or asks for
// something: no JetStream (it is on only where opts turns it on), users,
// nkeys. It listens on loopback, on a free port unless opts names one,
// logs nothing, and is shut down when the test ends.
func StartServer(t testing.TB, opts *server.Options) *server.Server {
	t.Helper()
	opts.Host, opts.NoLog, opts.NoSigs = "127.0.0.1", true, true
	if opts.Port == 0 {
		opts.Port = -1
	}
	s, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	t.Cleanup(s.Shutdown)
	if !s.ReadyForConnections(stack.Scaled(time.Minute)) {
		t.Fatal("nats server not ready")
	}
	return s
}
