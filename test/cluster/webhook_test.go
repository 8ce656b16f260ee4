//go:build linux

package cluster

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/test/stack"
)

// webhookReceiver is the generic webhook notify posts each result's
// CloudEvent to: what it counts is what the people notify tells saw.
type webhookReceiver struct {
	srv       *httptest.Server
	mu        sync.Mutex
	delivered map[string]int // input key → converted events received
	other     []string       // anything else received, by type and subject
}

func newWebhookReceiver(t *testing.T) *webhookReceiver {
	t.Helper()
	w := &webhookReceiver{delivered: map[string]int{}}
	w.srv = httptest.NewServer(http.HandlerFunc(w.receive))
	t.Cleanup(w.srv.Close)
	return w
}

// URL is IMAGEPIPE_WEBHOOK_URL for notify.
func (w *webhookReceiver) URL() string { return w.srv.URL + "/imagepipe" }

func (w *webhookReceiver) receive(rw http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(rw, err.Error(), http.StatusBadRequest)
		return
	}
	ev, err := events.Decode(body)
	if err != nil {
		http.Error(rw, err.Error(), http.StatusBadRequest)
		return
	}
	var c events.Converted
	w.mu.Lock()
	defer w.mu.Unlock()
	if ev.DecodeData(events.TypeConverted, &c) == nil {
		w.delivered[c.InputKey]++
	} else {
		w.other = append(w.other, ev.Type+" "+ev.Subject)
	}
	rw.WriteHeader(http.StatusNoContent)
}

// counts returns the converted events received per input key, and the
// rest.
func (w *webhookReceiver) counts() (map[string]int, []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	delivered := make(map[string]int, len(w.delivered))
	for k, v := range w.delivered {
		delivered[k] = v
	}
	return delivered, slices.Clone(w.other)
}

// checkNotifyDeliveredOnce asserts that notify told of each image exactly once:
// it waits until every image has a notification and notify's consumer
// holds nothing that could bring another, then counts.
func checkNotifyDeliveredOnce(ctx context.Context, t *testing.T, js jetstream.JetStream, hook *webhookReceiver, want map[string]image) {
	t.Helper()
	wait := stack.Scaled(time.Minute)
	for deadline := time.Now().Add(wait); ; time.Sleep(200 * time.Millisecond) {
		delivered, _ := hook.counts()
		missing := 0
		for key := range want {
			if delivered[key] == 0 {
				missing++
			}
		}
		if missing == 0 && notifyIdle(ctx, js) {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("after %s, %d of %d images have no notification, or notify still holds results", wait, missing, len(want))
			break
		}
	}
	delivered, other := hook.counts()
	for key := range want {
		if n := delivered[key]; n != 1 {
			t.Errorf("%s: notify delivered %d notifications, want exactly one", key, n)
		}
	}
	for key, n := range delivered {
		if _, ok := want[key]; !ok {
			t.Errorf("notify delivered %d notifications of %s, an image the test never uploaded", n, key)
		}
	}
	if len(other) > 0 {
		t.Errorf("notify delivered notifications other than conversions: %v", other)
	}
	total := 0
	for _, n := range delivered {
		total += n
	}
	t.Logf("notify delivered %d notifications for %d images", total, len(want))
}

// notifyIdle is whether notify's consumer has nothing pending or
// unacknowledged.
func notifyIdle(ctx context.Context, js jetstream.JetStream) bool {
	cons, err := js.Consumer(ctx, events.StreamResults, events.ConsumerNotify)
	if err != nil {
		return false
	}
	info := cons.CachedInfo()
	return info.NumPending == 0 && info.NumAckPending == 0
}
