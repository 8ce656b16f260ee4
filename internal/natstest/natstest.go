// Package natstest starts an embedded NATS server with JetStream for one
// test, stopped when the test ends. Tests of every package that talks to
// JetStream use it, so none of them fakes NATS.
package natstest

import (
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/internal/natsserver"
)

// Start runs a fresh server with its store in the test's temp dir and
// returns a connection to it.
func Start(t testing.TB) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	srv, err := natsserver.Start(natsserver.Options{Port: -1, StoreDir: t.TempDir(), Name: "test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Shutdown)
	nc, err := nats.Connect(srv.URL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js
}
