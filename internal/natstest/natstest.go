// Package natstest starts an embedded NATS server with JetStream for one
// test, stopped when the test ends, and gives tests a log destination they
// can read while the code under test writes. Tests of every package that
// talks to JetStream use it, so none of them fakes NATS.
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
	return Connect(t, srv.URL())
}

// Connect is a client of the server at url, closed when the test ends:
// another process's view of the same server.
func Connect(t testing.TB, url string) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, err := nats.Connect(url)
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
