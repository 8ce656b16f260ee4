package main

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// slackRecorder is a Slack incoming webhook on loopback that keeps what it
// is sent and answers as Slack does.
type slackRecorder struct {
	srv  *httptest.Server
	mu   sync.Mutex
	msgs []map[string]any
}

func newSlackRecorder() *slackRecorder {
	r := &slackRecorder{}
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(req.Body)
		var m map[string]any
		if req.Method != http.MethodPost || json.Unmarshal(body, &m) != nil || m["text"] == nil {
			http.Error(w, "invalid_payload", http.StatusBadRequest)
			return
		}
		r.mu.Lock()
		r.msgs = append(r.msgs, m)
		r.mu.Unlock()
		io.WriteString(w, "ok")
	}))
	return r
}

// mentioning returns the messages whose JSON mentions s.
func (r *slackRecorder) mentioning(s string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, m := range r.msgs {
		b, _ := json.Marshal(m)
		if strings.Contains(string(b), s) {
			out = append(out, string(b))
		}
	}
	return out
}

func TestSlackWebhookHearsOfEachResultOnceThroughDev(t *testing.T) {
	dir := t.TempDir()
	path := makeImage(t, dir, "slack.qcow2", "qcow2", "write -P 0x41 0 1M")
	res := subscribeResults(t)
	key := "e2e/slack/slack-demo.qcow2"
	upload(t, key, path, false)
	c := converted(t, res.await(t, key, 60*time.Second))

	deadline := time.Now().Add(scaled(20 * time.Second))
	for len(e2e.slack.mentioning("slack-demo.qcow2")) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("Slack webhook got no message for the conversion")
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond)
	msgs := e2e.slack.mentioning("slack-demo.qcow2")
	if len(msgs) != 1 {
		t.Fatalf("Slack got %d messages for one result, want 1: %v", len(msgs), msgs)
	}
	for _, want := range []string{c.OutputKey, "qcow2", "good"} {
		if !strings.Contains(msgs[0], want) {
			t.Errorf("Slack message lacks %q: %s", want, msgs[0])
		}
	}
}
