package natsrt

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
)

func marshalEvent(e events.Event) ([]byte, error) {
	b, err := json.Marshal(e)
	if err != nil {
		return nil, fmt.Errorf("encode event %s: %w", e.ID, err)
	}
	return b, nil
}

// Publish sends events to their streams outside a handler, with the event
// id as Nats-Msg-Id.
func Publish(ctx context.Context, js jetstream.JetStream, msgs ...events.Message) error {
	for _, m := range msgs {
		data, err := marshalEvent(m.Event)
		if err != nil {
			return err
		}
		pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err = js.PublishMsg(pctx, &nats.Msg{Subject: m.Subject, Data: data}, jetstream.WithMsgID(m.Event.ID))
		cancel()
		if err != nil {
			return fmt.Errorf("publish %s to %s: %w", m.Event.Type, m.Subject, err)
		}
	}
	return nil
}
