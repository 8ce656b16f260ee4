package natsrt_test

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/natstest"
)

func TestCloseGetsTheReplyBeingAnsweredOutThenReturnsOnceClosed(t *testing.T) {
	nc, _ := natstest.Start(t)
	client, err := nats.Connect(nc.ConnectedUrl())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	started, release := make(chan struct{}), make(chan struct{})
	if _, err := nc.Subscribe("svc.stop", func(m *nats.Msg) {
		close(started)
		<-release
		_ = m.Respond([]byte("stopping"))
	}); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	reply := make(chan string, 1)
	go func() {
		m, err := client.Request("svc.stop", nil, time.Minute)
		if err != nil {
			reply <- err.Error()
			return
		}
		reply <- string(m.Data)
	}()
	<-started
	const within = 10 * time.Minute
	closed := make(chan time.Duration, 1)
	go func() {
		begin := time.Now()
		natsrt.Close(nc, within)
		closed <- time.Since(begin)
	}()
	close(release)
	if got := <-reply; got != "stopping" {
		t.Errorf("the request being answered got %q, want its reply", got)
	}
	// Close returns once the drain has closed the connection, not when
	// its wait runs out.
	if took := <-closed; took >= within/2 || !nc.IsClosed() {
		t.Errorf("Close took %s (closed: %v), want it back once the drain closed the connection", took, nc.IsClosed())
	}
}
