package natsrt

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
)

// ExhaustedHandler makes the events that report a message its consumer has
// given up on: delivered MaxDeliver times and never settled, because its
// worker died on every attempt. It must not fail; what it returns is
// published as it is.
type ExhaustedHandler func(ctx context.Context, data []byte, deliveries int) []events.Message

// maxDeliveriesAdvisory is what JetStream publishes when a consumer stops
// delivering a message.
type maxDeliveriesAdvisory struct {
	Stream     string `json:"stream"`
	Consumer   string `json:"consumer"`
	StreamSeq  uint64 `json:"stream_seq"`
	Deliveries int    `json:"deliveries"`
}

// WatchExhausted reports, until ctx ends, every message the binding's
// consumer gives up on. The runtime settles every message whose handler
// returns, so only a worker that never returned (killed, out of memory)
// leaves one behind; without this the job would end in silence. One replica
// handles each advisory (a queue group). The message is then removed from
// a work-queue stream, where nothing else would ever remove it.
func WatchExhausted(ctx context.Context, js jetstream.JetStream, b Binding, report ExhaustedHandler, log *slog.Logger) error {
	log = log.With("consumer", b.Durable)
	subject := fmt.Sprintf("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.%s.%s", b.Stream, b.Durable)
	sub, err := js.Conn().QueueSubscribe(subject, "imagepipe-exhausted-"+b.Durable, func(m *nats.Msg) {
		var adv maxDeliveriesAdvisory
		if err := json.Unmarshal(m.Data, &adv); err != nil || adv.StreamSeq == 0 {
			log.Warn("unreadable max-deliveries advisory", "err", err)
			return
		}
		handleExhausted(ctx, js, b.Stream, adv, report, log)
	})
	if err != nil {
		return fmt.Errorf("watch %s for messages given up on: %w", b.Durable, err)
	}
	go func() {
		<-ctx.Done()
		_ = sub.Unsubscribe()
	}()
	return nil
}

func handleExhausted(ctx context.Context, js jetstream.JetStream, stream string, adv maxDeliveriesAdvisory, report ExhaustedHandler, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	log = log.With("stream_seq", adv.StreamSeq, "deliveries", adv.Deliveries)
	s, err := js.Stream(ctx, stream)
	if err != nil {
		log.Warn("message given up on, but its stream is out of reach", "err", err)
		return
	}
	raw, err := s.GetMsg(ctx, adv.StreamSeq)
	if err != nil {
		// Settled after all, or removed by an operator: nothing to report.
		log.Info("message given up on is gone already", "err", err)
		return
	}
	out := report(ctx, raw.Data, adv.Deliveries)
	if err := Publish(ctx, js, out...); err != nil {
		log.Error("message given up on could not be reported", "err", err)
		return
	}
	log.Warn("message given up on after its workers never finished it; reported", "events", len(out))
	if s.CachedInfo().Config.Retention != jetstream.WorkQueuePolicy {
		return
	}
	if err := s.DeleteMsg(ctx, adv.StreamSeq); err != nil {
		log.Warn("reported message not removed from its work queue", "err", err)
	}
}
