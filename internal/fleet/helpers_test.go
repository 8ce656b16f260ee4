package fleet_test

import (
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/internal/natstest"
)

type stack struct {
	url string
	js  jetstream.JetStream
}

// startNATS runs a JetStream server of the test's own.
func startNATS(t *testing.T) stack {
	t.Helper()
	nc, js := natstest.Start(t)
	return stack{url: nc.ConnectedUrl(), js: js}
}

// reader is a second client of s, as another process would be.
func (s stack) reader(t *testing.T) jetstream.JetStream {
	t.Helper()
	_, js := natstest.Connect(t, s.url)
	return js
}
