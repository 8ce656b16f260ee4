package natsrt

import (
	"context"
	"log/slog"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
)

// TypedHandler handles one decoded event: what a function's Handle looks
// like once the runtime has read the message for it.
type TypedHandler[T any] func(ctx context.Context, v T, d Delivery) ([]events.Message, error)

// Typed adapts a handler of one CloudEvents type to the runtime. It
// decodes the envelope and its data once, here, so that a function never
// sees bytes; a message that is not a CloudEvent of eventType can never
// become one, so it is a permanent failure of intake and is terminated.
func Typed[T any](eventType string, h TypedHandler[T]) Handler {
	return func(ctx context.Context, data []byte, d Delivery) ([]events.Message, error) {
		v, err := decodeTyped[T](data, eventType)
		if err != nil {
			return nil, failure.Permanent(events.PhaseIntake, err, "")
		}
		return h(ctx, v, d)
	}
}

// AnyEvent adapts a handler that takes CloudEvents of several types, and
// tells them apart itself (notify takes results and queue alerts alike).
// A message that is no CloudEvent is a permanent failure of phase, the
// stage the function is in when it reads one.
func AnyEvent(phase events.Phase, h TypedHandler[events.Event]) Handler {
	return func(ctx context.Context, data []byte, d Delivery) ([]events.Message, error) {
		ev, err := events.Decode(data)
		if err != nil {
			return nil, failure.Permanent(phase, err, "")
		}
		return h(ctx, ev, d)
	}
}

// Payload adapts a handler of messages that are no CloudEvent, such as
// MinIO's bucket notifications, which the handler parses itself, and which
// needs no word of its attempt.
func Payload(h func(ctx context.Context, data []byte) ([]events.Message, error)) Handler {
	return func(ctx context.Context, data []byte, _ Delivery) ([]events.Message, error) {
		return h(ctx, data)
	}
}

// TypedExhausted adapts the report of a message given up on (see
// WatchExhausted) as Typed adapts its handler. A message that cannot be
// read has nothing to report: that is logged, and nothing is published.
func TypedExhausted[T any](eventType string, report func(ctx context.Context, v T, deliveries int) []events.Message, log *slog.Logger) ExhaustedHandler {
	return func(ctx context.Context, data []byte, deliveries int) []events.Message {
		v, err := decodeTyped[T](data, eventType)
		if err != nil {
			log.Warn("a message given up on cannot be read; nothing to report", "err", err)
			return nil
		}
		return report(ctx, v, deliveries)
	}
}

// Describe adapts, for Binding.Describe, a function that names the input
// of one CloudEvents type. An unreadable message gets the zero JobRef.
func Describe[T any](eventType string, name func(v T) events.JobRef) func(data []byte) events.JobRef {
	return func(data []byte) events.JobRef {
		v, err := decodeTyped[T](data, eventType)
		if err != nil {
			return events.JobRef{}
		}
		return name(v)
	}
}

// decodeTyped reads a CloudEvent of eventType and its data.
func decodeTyped[T any](data []byte, eventType string) (T, error) {
	var v T
	ev, err := events.Decode(data)
	if err == nil {
		err = ev.DecodeData(eventType, &v)
	}
	return v, err
}
