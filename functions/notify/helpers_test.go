package notify_test

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/notify"
	"github.com/imagepipe/imagepipe/internal/natstest"
	"github.com/imagepipe/imagepipe/test/stack"
)

// startJetStream runs an embedded NATS server with JetStream of the
// test's own and returns a JetStream client bound to it.
func startJetStream(t *testing.T) jetstream.JetStream {
	t.Helper()
	_, js := natstest.Start(t)
	return js
}

// logBuffer collects JSON log lines from concurrent goroutines.
type logBuffer struct{ natstest.LogBuffer }

// lines returns the log records whose msg is msg.
func (l *logBuffer) lines(t *testing.T, msg string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(l.String()), "\n") {
		if line == "" {
			continue
		}
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if rec["msg"] == msg {
			out = append(out, rec)
		}
	}
	return out
}

func newLogger() (*slog.Logger, *logBuffer) {
	lb := &logBuffer{}
	return slog.New(slog.NewJSONHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug})), lb
}

func newHandler(t *testing.T, cfg notify.Config, ledger notify.Ledger, opts ...notify.Option) (*notify.Handler, *logBuffer) {
	t.Helper()
	log, lb := newLogger()
	if cfg.NotifyOn == nil {
		cfg.NotifyOn = []string{"success", "failure", "stalled"}
	}
	if cfg.HTTPTimeout == 0 {
		cfg.HTTPTimeout = 3 * time.Second
	}
	h, err := notify.NewHandler(cfg, ledger, log, nil, opts...)
	if err != nil {
		t.Fatalf("NewHandler: %v", err)
	}
	return h, lb
}

var eventTime = time.Date(2026, 11, 23, 7, 45, 27, 0, time.UTC)

func mustEvent(t *testing.T, id, typ, subject string, data any) events.Event {
	t.Helper()
	ev, err := events.New(id, typ, "imagepipe/test", subject, eventTime, data)
	if err != nil {
		t.Fatal(err)
	}
	return ev
}

func convertedEvent(t *testing.T, id string) events.Event {
	return mustEvent(t, id, events.TypeConverted, "disks/win11.vhdx", events.Converted{
		JobID:        "7d0c1e55-6f7e-5a0b-9d55-0b0e3c1f2a11",
		InputBucket:  "uploads",
		InputKey:     "disks/win11.vhdx",
		InputFormat:  "vhdx",
		InputSize:    25165824,
		VirtualSize:  68719476736,
		OutputBucket: "images",
		OutputKey:    "disks/win11.vhdx.raw",
		OutputFormat: "raw",
		OutputSize:   68719476736,
		SHA256:       "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
		DurationMS:   83_000,
		Attempt:      1,
	})
}

func failedEvent(t *testing.T, id string, willRetry bool) events.Event {
	return mustEvent(t, id, events.TypeFailed, "disks/evil.qcow2", events.Failed{
		JobID:       "1b2c3d4e-0000-5000-8000-000000000001",
		InputBucket: "uploads",
		InputKey:    "disks/evil.qcow2",
		InputFormat: "qcow2",
		Phase:       events.PhaseInspect,
		Message:     "the image names a backing file (/etc/shadow)",
		Suggestion:  "Flatten the image with qemu-img convert before uploading it.",
		Rule:        "no-backing-file",
		Attempt:     1,
		WillRetry:   willRetry,
		DurationMS:  1200,
	})
}

func stalledEvent(t *testing.T, id string) events.Event {
	return mustEvent(t, id, events.TypeStalled, "JOBS/convert", notify.QueueAlert{
		Stream: "JOBS", Consumer: "convert", QueueDepth: 3, IdleMinutes: 75,
		LastActivity: eventTime.Add(-75 * time.Minute),
	})
}

// recorded is one request a test server received.
type recorded struct {
	header http.Header
	body   []byte
	at     time.Time
}

// answer is what a test server replies to one request.
type answer struct {
	status int
	header map[string]string
	body   string
	delay  time.Duration
}

// service is a loopback HTTP server that validates every request with check,
// records it, and replies with the scripted answers in turn (the last one
// repeats).
type service struct {
	*httptest.Server
	t       *testing.T
	mu      sync.Mutex
	reqs    []recorded
	answers []answer
	check   func(t *testing.T, r *http.Request, body []byte)
}

func newService(t *testing.T, check func(t *testing.T, r *http.Request, body []byte), answers ...answer) *service {
	t.Helper()
	s := &service{t: t, answers: answers, check: check}
	s.Server = httptest.NewServer(http.HandlerFunc(s.serve))
	t.Cleanup(s.Close)
	return s
}

func (s *service) serve(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		s.t.Errorf("read body: %v", err)
	}
	if s.check != nil {
		s.check(s.t, r, body)
	}
	s.mu.Lock()
	n := len(s.reqs)
	s.reqs = append(s.reqs, recorded{header: r.Header.Clone(), body: body, at: time.Now()})
	a := answer{status: http.StatusOK}
	if len(s.answers) > 0 {
		a = s.answers[min(n, len(s.answers)-1)]
	}
	s.mu.Unlock()
	if a.delay > 0 {
		select {
		case <-time.After(a.delay):
		case <-r.Context().Done():
			return
		}
	}
	for k, v := range a.header {
		w.Header().Set(k, v)
	}
	w.WriteHeader(a.status)
	_, _ = io.WriteString(w, a.body)
}

func (s *service) requests() []recorded {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]recorded(nil), s.reqs...)
}

func (s *service) count() int { return len(s.requests()) }

func handle(t *testing.T, h *notify.Handler, ev events.Event) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(30*time.Second))
	defer cancel()
	return h.Handle(ctx, ev)
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
