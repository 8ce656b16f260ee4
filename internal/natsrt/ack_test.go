package natsrt

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/internal/natstest"
)

// unansweredAcks is a delivered message whose first acks get no answer, as
// while the stream's leader changes; the rest of jetstream.Msg is unused.
type unansweredAcks struct {
	jetstream.Msg
	fail  []error // the errors of the first acks, in order
	tries int
}

func (m *unansweredAcks) DoubleAck(ctx context.Context) error {
	m.tries++
	if m.tries <= len(m.fail) {
		return m.fail[m.tries-1]
	}
	return nil
}

func TestAckUnansweredDuringALeaderChangeIsSentAgainUntilConfirmed(t *testing.T) {
	var logs bytes.Buffer
	w := &Worker{binding: Binding{AckWait: time.Minute}, log: slog.New(slog.NewTextHandler(&logs, nil))}
	msg := &unansweredAcks{fail: []error{context.DeadlineExceeded, nats.ErrNoResponders, nats.ErrTimeout}}
	w.ack(context.Background(), msg)
	if msg.tries != 4 {
		t.Fatalf("ack sent %d times, want 4 (three unanswered, then confirmed)", msg.tries)
	}
	if n := strings.Count(logs.String(), "\n"); n != 1 || !strings.Contains(logs.String(), "ack confirmed") {
		t.Fatalf("logged %d lines, want one that says the ack was confirmed:\n%s", n, logs.String())
	}
}

func TestAckRefusedForGoodIsNotSentAgain(t *testing.T) {
	var logs bytes.Buffer
	w := &Worker{binding: Binding{AckWait: time.Minute}, log: slog.New(slog.NewTextHandler(&logs, nil))}
	msg := &unansweredAcks{fail: []error{jetstream.ErrMsgAlreadyAckd}}
	w.ack(context.Background(), msg)
	if msg.tries != 1 {
		t.Fatalf("ack sent %d times, want once", msg.tries)
	}
	if !strings.Contains(logs.String(), "ack failed") {
		t.Fatalf("log does not say the ack failed:\n%s", logs.String())
	}
}

func TestAckIsRetriedNoLongerThanAckWait(t *testing.T) {
	w := &Worker{binding: Binding{AckWait: 500 * time.Millisecond}, log: slog.New(slog.DiscardHandler)}
	never := make([]error, 1000)
	for i := range never {
		never[i] = nats.ErrNoResponders
	}
	msg := &unansweredAcks{fail: never}
	w.ack(context.Background(), msg)
	if msg.tries < 2 || msg.tries >= len(never) {
		t.Fatalf("ack sent %d times, want a few within AckWait and then given up", msg.tries)
	}
}

// replyOnly is a delivered message of which the term uses only the reply
// subject.
type replyOnly struct {
	jetstream.Msg
	reply string
}

func (m replyOnly) Reply() string { return m.reply }

// A term sent while no server answers (a leader change, a restart) is sent
// again until one confirms it, as an ack is.
func TestTermUnansweredIsSentAgainUntilConfirmed(t *testing.T) {
	nc, js := natstest.Start(t)
	var logs bytes.Buffer
	w := &Worker{js: js, binding: Binding{AckWait: time.Minute}, log: slog.New(slog.NewTextHandler(&logs, nil))}
	const reply = "$JS.ACK.test.reply"

	// Nobody answers on the reply subject for a while, then somebody
	// does, as the consumer's new leader would.
	got := make(chan string, 10)
	answer := time.AfterFunc(300*time.Millisecond, func() {
		sub, err := nc.Subscribe(reply, func(m *nats.Msg) {
			got <- string(m.Data)
			_ = m.Respond(nil)
		})
		if err == nil {
			t.Cleanup(func() { _ = sub.Unsubscribe() })
		}
	})
	defer answer.Stop()

	w.term(context.Background(), replyOnly{reply: reply}, "refused by rule extension-mismatch")
	select {
	case body := <-got:
		if body != "+TERM refused by rule extension-mismatch" {
			t.Errorf("the server was sent %q, want +TERM and the reason", body)
		}
	default:
		t.Fatal("term returned before the server confirmed it")
	}
	if n := strings.Count(logs.String(), "\n"); n != 1 || !strings.Contains(logs.String(), "term confirmed after the server did not answer") {
		t.Fatalf("logged %d lines, want one that says the term was confirmed:\n%s", n, logs.String())
	}
}
