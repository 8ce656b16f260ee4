package notify

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/setup"
)

// Ledger records (event id, channel) deliveries so a redelivered result never
// posts twice.
type Ledger interface {
	Delivered(ctx context.Context, eventID, channel string) (bool, error)
	MarkDelivered(ctx context.Context, eventID, channel string) error
}

// LedgerTTL is how long a delivery is remembered. It only has to outlast
// redelivery of the same result, which the RESULTS consumer gives up on long
// before a week.
const LedgerTTL = 7 * 24 * time.Hour

// KVLedger implements Ledger on a JetStream key-value bucket, so every
// replica of notify shares one memory of what was sent.
type KVLedger struct {
	kv jetstream.KeyValue
}

var _ Ledger = (*KVLedger)(nil)

// NewKVLedger opens the ledger bucket, creating it on first use with
// replicas copies (as many as the streams have: losing a node must not make
// notify forget what it sent). An existing bucket is used as it is.
func NewKVLedger(ctx context.Context, js jetstream.JetStream, replicas int) (*KVLedger, error) {
	kv, err := setup.KV(ctx, js, jetstream.KeyValueConfig{
		Bucket:      events.NotifyLedgerBucket,
		Description: "imagepipe notify: notifications already delivered, by event and channel",
		TTL:         LedgerTTL,
		History:     1,
		Replicas:    max(replicas, 1),
	})
	if err != nil {
		return nil, fmt.Errorf("notify ledger: %w", err)
	}
	return &KVLedger{kv: kv}, nil
}

// ledgerKey hashes the pair: event ids and channel names may hold characters
// a KV key may not, and a separator byte keeps ("ab","c") apart from ("a","bc").
func ledgerKey(eventID, channel string) string {
	h := sha256.New()
	h.Write([]byte(eventID))
	h.Write([]byte{0})
	h.Write([]byte(channel))
	return hex.EncodeToString(h.Sum(nil))
}

type ledgerRecord struct {
	EventID string    `json:"event_id"`
	Channel string    `json:"channel"`
	At      time.Time `json:"at"`
}

// Delivered reports whether the channel already took the event.
func (l *KVLedger) Delivered(ctx context.Context, eventID, channel string) (bool, error) {
	_, err := l.kv.Get(ctx, ledgerKey(eventID, channel))
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, jetstream.ErrKeyNotFound):
		return false, nil
	}
	return false, fmt.Errorf("ledger get %s/%s: %w", eventID, channel, err)
}

// MarkDelivered records that the channel took the event. The value is
// readable so an operator can see what a key stands for.
func (l *KVLedger) MarkDelivered(ctx context.Context, eventID, channel string) error {
	v, err := json.Marshal(ledgerRecord{EventID: eventID, Channel: channel, At: time.Now().UTC()})
	if err != nil {
		return err
	}
	if _, err := l.kv.Put(ctx, ledgerKey(eventID, channel), v); err != nil {
		return fmt.Errorf("ledger put %s/%s: %w", eventID, channel, err)
	}
	return nil
}

// memoryLedger de-duplicates within one process only. It is what a Handler
// uses without a ledger, which is enough for a single replica that never
// restarts mid-delivery, such as `imagepipe dev`.
type memoryLedger struct {
	mu   sync.Mutex
	seen map[string]bool
}

func (l *memoryLedger) Delivered(_ context.Context, eventID, channel string) (bool, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.seen[ledgerKey(eventID, channel)], nil
}

func (l *memoryLedger) MarkDelivered(_ context.Context, eventID, channel string) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.seen == nil {
		l.seen = map[string]bool{}
	}
	l.seen[ledgerKey(eventID, channel)] = true
	return nil
}
