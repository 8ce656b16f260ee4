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
