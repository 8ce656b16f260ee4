package natsrt

import (
	"context"
	"encoding/json"
	"errors"
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
	// The advisory is a plain NATS message: if no replica was connected
	// when it fired (the only one crash-looping on this very job), nobody
	// heard it. The message itself stays in the stream, behind the
	// consumer's ack floor; look for such messages now and then.
	go func() {
		t := time.NewTicker(exhaustedSweepEvery)
		defer t.Stop()
		for {
			sweepExhausted(ctx, js, b, report, log)
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return nil
}

// exhaustedSweepEvery is how often WatchExhausted looks for messages given
// up on whose advisory nobody heard.
const exhaustedSweepEvery = 5 * time.Minute

// sweepExhausted reports the messages the binding's consumer has given up
// on that are still in its stream. The consumer's ack floor passes a
// message once it is settled or its deliveries are spent and a later one is
// acknowledged, and a work-queue stream keeps only what was never settled,
// so every message at or below the floor is one given up on. Replicas may sweep at once; the reports
// carry the same event ids, which the stream takes once.
func sweepExhausted(ctx context.Context, js jetstream.JetStream, b Binding, report ExhaustedHandler, log *slog.Logger) {
	if ctx.Err() != nil {
		return
	}
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cons, err := js.Consumer(sctx, b.Stream, b.Durable)
	if err != nil {
		log.Warn("looking for messages given up on: consumer out of reach", "err", err)
		return
	}
	info := cons.CachedInfo()
	s, err := js.Stream(sctx, b.Stream)
	if err != nil {
		log.Warn("looking for messages given up on: stream out of reach", "err", err)
		return
	}
	if s.CachedInfo().Config.Retention != jetstream.WorkQueuePolicy {
		return // other streams keep settled messages too: the floor proves nothing
	}
	floor := info.AckFloor.Stream
	if info.NumAckPending == 0 {
		// Nothing is in flight or waiting for a redelivery, so everything
		// delivered is settled or given up on; the floor itself only moves
		// when a later message is acknowledged.
		floor = info.Delivered.Stream
	}
	subject := b.FilterSubject
	if subject == "" {
		subject = ">"
	}
	for seq := s.CachedInfo().State.FirstSeq; seq > 0 && seq <= floor; {
		// The first message at or after seq: removed ones leave gaps.
		m, err := s.GetMsg(sctx, seq, jetstream.WithGetMsgSubject(subject))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return
		}
		if err != nil {
			log.Warn("looking for messages given up on", "err", err)
			return
		}
		if m.Sequence > floor {
			return
		}
		reportExhausted(ctx, js, s, m, info.Config.MaxDeliver, report, log)
		seq = m.Sequence + 1
	}
}

func handleExhausted(ctx context.Context, js jetstream.JetStream, stream string, adv maxDeliveriesAdvisory, report ExhaustedHandler, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, stream)
	if err != nil {
		log.Warn("message given up on, but its stream is out of reach", "stream_seq", adv.StreamSeq, "err", err)
		return
	}
	raw, err := s.GetMsg(ctx, adv.StreamSeq)
	if err != nil {
		// Settled after all, or removed by an operator: nothing to report.
		log.Info("message given up on is gone already", "stream_seq", adv.StreamSeq, "err", err)
		return
	}
	reportExhausted(ctx, js, s, raw, adv.Deliveries, report, log)
}

// reportExhausted publishes what report makes of msg, given up on after
// deliveries, and takes it out of a work-queue stream, where nothing else
// would ever remove it.
func reportExhausted(ctx context.Context, js jetstream.JetStream, s jetstream.Stream, msg *jetstream.RawStreamMsg, deliveries int, report ExhaustedHandler, log *slog.Logger) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
	defer cancel()
	log = log.With("stream_seq", msg.Sequence, "deliveries", deliveries)
	out := report(ctx, msg.Data, deliveries)
	if err := Publish(ctx, js, out...); err != nil {
		log.Error("message given up on could not be reported", "err", err)
		return
	}
	log.Warn("message given up on after its workers never finished it; reported", "events", len(out))
	if s.CachedInfo().Config.Retention != jetstream.WorkQueuePolicy {
		return
	}
	if err := s.DeleteMsg(ctx, msg.Sequence); err != nil {
		log.Warn("reported message not removed from its work queue", "err", err)
	}
}
