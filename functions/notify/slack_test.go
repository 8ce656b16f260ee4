package notify_test

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/notify"
	"github.com/imagepipe/imagepipe/internal/failure"
)

// checkSlackMessage applies the rules Slack enforces on a message payload
// (chat.postMessage and incoming webhooks alike): something to show, at most
// 50 blocks, and each block within its own limits.
func checkSlackMessage(t *testing.T, msg map[string]any) {
	t.Helper()
	text, _ := msg["text"].(string)
	blocks, _ := msg["blocks"].([]any)
	atts, _ := msg["attachments"].([]any)
	if text == "" && len(blocks) == 0 && len(atts) == 0 {
		t.Errorf("slack: message has no text, blocks or attachments")
	}
	if text == "" && len(blocks) > 0 {
		t.Errorf("slack: blocks without top-level text leave notifications empty")
	}
	checkSlackBlocks(t, "blocks", blocks)
	for i, a := range atts {
		att, ok := a.(map[string]any)
		if !ok {
			t.Errorf("slack: attachment %d is not an object", i)
			continue
		}
		switch c, _ := att["color"].(string); {
		case c == "good", c == "warning", c == "danger":
		case strings.HasPrefix(c, "#") && len(c) == 7:
		default:
			t.Errorf("slack: attachment %d color %q", i, c)
		}
		ab, _ := att["blocks"].([]any)
		checkSlackBlocks(t, "attachment blocks", ab)
	}
}

func checkSlackBlocks(t *testing.T, where string, blocks []any) {
	t.Helper()
	if len(blocks) > 50 {
		t.Errorf("slack: %s: %d blocks, at most 50", where, len(blocks))
	}
	for i, raw := range blocks {
		b, ok := raw.(map[string]any)
		if !ok {
			t.Errorf("slack: %s[%d] is not an object", where, i)
			continue
		}
		if id, ok := b["block_id"].(string); ok && (id == "" || len(id) > 255) {
			t.Errorf("slack: %s[%d] block_id %q", where, i, id)
		}
		switch b["type"] {
		case "header":
			checkSlackText(t, b["text"], 150, "plain_text")
		case "section":
			fields, _ := b["fields"].([]any)
			if b["text"] == nil && len(fields) == 0 {
				t.Errorf("slack: %s[%d] section needs text or fields", where, i)
			}
			if b["text"] != nil {
				checkSlackText(t, b["text"], 3000, "plain_text", "mrkdwn")
			}
			if len(fields) > 10 {
				t.Errorf("slack: %s[%d] section has %d fields, at most 10", where, i, len(fields))
			}
			for _, f := range fields {
				checkSlackText(t, f, 2000, "plain_text", "mrkdwn")
			}
		case "context":
			els, _ := b["elements"].([]any)
			if len(els) == 0 || len(els) > 10 {
				t.Errorf("slack: %s[%d] context has %d elements, want 1..10", where, i, len(els))
			}
			for _, e := range els {
				checkSlackText(t, e, 3000, "plain_text", "mrkdwn")
			}
		case "divider":
		default:
			t.Errorf("slack: %s[%d] unexpected block type %v", where, i, b["type"])
		}
	}
}

func checkSlackText(t *testing.T, raw any, limit int, types ...string) {
	t.Helper()
	obj, ok := raw.(map[string]any)
	if !ok {
		t.Errorf("slack: text object %v is not an object", raw)
		return
	}
	typ, _ := obj["type"].(string)
	text, _ := obj["text"].(string)
	okType := false
	for _, want := range types {
		okType = okType || typ == want
	}
	if !okType {
		t.Errorf("slack: text type %q, want one of %v", typ, types)
	}
	if n := utf8.RuneCountInString(text); n == 0 || n > limit {
		t.Errorf("slack: text of %d characters, want 1..%d: %q", n, limit, text)
	}
	if typ == "mrkdwn" && strings.Contains(text, "<!") {
		t.Errorf("slack: unescaped mention in %q", text)
	}
}

// slackTexts gathers every text a reader would see, for content assertions.
func slackTexts(v any) string {
	var b strings.Builder
	var walk func(any)
	walk = func(v any) {
		switch x := v.(type) {
		case map[string]any:
			if s, ok := x["text"].(string); ok {
				b.WriteString(s)
				b.WriteByte('\n')
			}
			for _, c := range x {
				walk(c)
			}
		case []any:
			for _, c := range x {
				walk(c)
			}
		}
	}
	walk(v)
	return b.String()
}

func slackWebhookCheck(t *testing.T, r *http.Request, body []byte) {
	if r.Method != http.MethodPost || r.Header.Get("Content-Type") != "application/json" {
		t.Errorf("slack webhook: %s with Content-Type %q", r.Method, r.Header.Get("Content-Type"))
	}
	var msg map[string]any
	if err := json.Unmarshal(body, &msg); err != nil {
		t.Errorf("slack webhook: body is not JSON: %v", err)
		return
	}
	checkSlackMessage(t, msg)
}

func decodeSlack(t *testing.T, body []byte) map[string]any {
	t.Helper()
	var msg map[string]any
	if err := json.Unmarshal(body, &msg); err != nil {
		t.Fatal(err)
	}
	return msg
}

const slackWebhookPath = "/services/T0000000/B0000000/XXXXXXXXXXXXXXXXXXXXXXXX"

func TestSlackWebhookPostsBlockKitColouredByOutcome(t *testing.T) {
	tests := []struct {
		name   string
		ev     events.Event
		color  string
		header string
		want   []string
	}{
		{
			name: "converted", ev: convertedEvent(t, "ev-ok"), color: "good",
			header: "Converted disks/win11.vhdx",
			want: []string{":white_check_mark:", "uploads/disks/win11.vhdx", "vhdx, 24.0 MiB", "raw, 64.0 GiB",
				"images/disks/win11.vhdx.raw", "1m23s", "event ev-ok"},
		},
		{
			name: "failed", ev: failedEvent(t, "ev-bad", false), color: "danger",
			header: "Failed to convert disks/evil.qcow2",
			want: []string{":x:", "*Phase*\ninspect", "*Error*\nthe image names a backing file (/etc/shadow)",
				"*Suggestion*\nFlatten the image", "no-backing-file"},
		},
		{
			name: "stalled", ev: stalledEvent(t, "ev-stall"), color: "warning",
			header: "Conversion queue stalled",
			want:   []string{":warning:", "JOBS/convert", "*Jobs waiting*\n3", "75 min"},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv := newService(t, slackWebhookCheck, answer{status: 200, body: "ok"})
			h, _ := newHandler(t, notify.Config{SlackWebhookURL: srv.URL + slackWebhookPath}, nil)
			if err := handle(t, h, tc.ev); err != nil {
				t.Fatalf("Handle: %v", err)
			}
			reqs := srv.requests()
			if len(reqs) != 1 {
				t.Fatalf("slack got %d requests, want 1", len(reqs))
			}
			msg := decodeSlack(t, reqs[0].body)
			blocks := msg["blocks"].([]any)
			header := blocks[0].(map[string]any)
			if header["type"] != "header" || header["text"].(map[string]any)["text"] != tc.header {
				t.Errorf("first block = %v, want header %q", header, tc.header)
			}
			att := msg["attachments"].([]any)[0].(map[string]any)
			if att["color"] != tc.color {
				t.Errorf("attachment color = %v, want %s", att["color"], tc.color)
			}
			all := slackTexts(msg)
			for _, w := range tc.want {
				if !strings.Contains(all, w) {
					t.Errorf("message lacks %q; texts:\n%s", w, all)
				}
			}
		})
	}
}

func TestSlackWebhookEscapesObjectKeys(t *testing.T) {
	srv := newService(t, slackWebhookCheck)
	h, _ := newHandler(t, notify.Config{SlackWebhookURL: srv.URL + slackWebhookPath}, nil)
	ev := mustEvent(t, "ev-esc", events.TypeFailed, "x", events.Failed{
		InputBucket: "uploads", InputKey: "<!channel> & <https://evil.example|click>.vhdx",
		Phase: events.PhaseIntake, Message: "not a disk image",
	})
	if err := handle(t, h, ev); err != nil {
		t.Fatal(err)
	}
	all := slackTexts(decodeSlack(t, srv.requests()[0].body))
	if !strings.Contains(all, "&lt;!channel&gt; &amp; &lt;https://evil.example|click&gt;.vhdx") {
		t.Errorf("key not escaped for mrkdwn:\n%s", all)
	}
}

func TestSlackWebhookHonoursRetryAfter(t *testing.T) {
	srv := newService(t, slackWebhookCheck,
		answer{status: http.StatusTooManyRequests, header: map[string]string{"Retry-After": "1"}, body: "rate_limited"},
		answer{status: http.StatusOK, body: "ok"})
	h, _ := newHandler(t, notify.Config{SlackWebhookURL: srv.URL + slackWebhookPath, HTTPTimeout: 5 * time.Second}, nil)

	if err := handle(t, h, convertedEvent(t, "ev-1")); err != nil {
		t.Fatalf("Handle: %v", err)
	}
	reqs := srv.requests()
	if len(reqs) != 2 {
		t.Fatalf("slack got %d requests, want 2 (429 then 200)", len(reqs))
	}
	if gap := reqs[1].at.Sub(reqs[0].at); gap < time.Second {
		t.Errorf("retried after %s, before the 1s Retry-After", gap)
	}
	if string(reqs[0].body) != string(reqs[1].body) {
		t.Errorf("retry sent a different payload")
	}
}

func TestSlackWebhookRetryAfterBeyondBudgetReturnsRetryable(t *testing.T) {
	srv := newService(t, slackWebhookCheck,
		answer{status: http.StatusTooManyRequests, header: map[string]string{"Retry-After": "120"}},
		answer{status: http.StatusOK, body: "ok"})
	h, _ := newHandler(t, notify.Config{SlackWebhookURL: srv.URL + slackWebhookPath, HTTPTimeout: 2 * time.Second}, nil)

	start := time.Now()
	err := handle(t, h, convertedEvent(t, "ev-1"))
	if err == nil || failure.IsPermanent(err) {
		t.Fatalf("Handle = %v, want a retryable error", err)
	}
	if time.Since(start) > time.Second {
		t.Errorf("Handle waited %s for a Retry-After it could not honour in time", time.Since(start))
	}
	var de *notify.DeliveryError
	if !errors.As(err, &de) || de.RetryAfter != 120*time.Second || de.Status != http.StatusTooManyRequests {
		t.Errorf("error %v does not carry the 120s Retry-After", err)
	}
	// The redelivery finds the channel not yet in the ledger and posts.
	if err := handle(t, h, convertedEvent(t, "ev-1")); err != nil {
		t.Fatalf("redelivery: %v", err)
	}
	if srv.count() != 2 {
		t.Errorf("slack got %d requests, want 2", srv.count())
	}
}

func TestSlackWebhookServerErrorIsRetryable(t *testing.T) {
	srv := newService(t, slackWebhookCheck,
		answer{status: http.StatusInternalServerError, body: "rollup_error"},
		answer{status: http.StatusOK, body: "ok"})
	h, lb := newHandler(t, notify.Config{SlackWebhookURL: srv.URL + slackWebhookPath}, nil)

	err := handle(t, h, failedEvent(t, "ev-5xx", false))
	if err == nil || failure.IsPermanent(err) {
		t.Fatalf("Handle = %v, want retryable", err)
	}
	if fe, ok := failure.As(err); !ok || fe.Phase != events.PhasePublish {
		t.Errorf("error %v is not a publish-phase failure", err)
	}
	if !strings.Contains(err.Error(), "rollup_error") || !strings.Contains(err.Error(), "500") {
		t.Errorf("error %q does not say what Slack answered", err)
	}
	if err := handle(t, h, failedEvent(t, "ev-5xx", false)); err != nil {
		t.Fatalf("redelivery: %v", err)
	}
	if srv.count() != 2 {
		t.Errorf("slack got %d requests, want 2", srv.count())
	}
	if strings.Contains(lb.String(), slackWebhookPath) || strings.Contains(lb.String(), "XXXXXXXXXXXXXXXX") {
		t.Errorf("log contains the webhook URL:\n%s", lb)
	}
}

func TestSlackWebhookBadRequestIsLoggedOnceAndNotRetried(t *testing.T) {
	srv := newService(t, slackWebhookCheck, answer{status: http.StatusBadRequest, body: "invalid_payload"})
	h, lb := newHandler(t, notify.Config{SlackWebhookURL: srv.URL + slackWebhookPath}, nil)

	for range 3 {
		if err := handle(t, h, failedEvent(t, "ev-400", false)); err != nil {
			t.Fatalf("Handle = %v; a refused channel must not fail the event", err)
		}
	}
	if srv.count() != 1 {
		t.Errorf("slack got %d requests, want 1: a 400 is not retried", srv.count())
	}
	refusals := lb.lines(t, "channel refused the notification; not retrying")
	if len(refusals) != 1 {
		t.Fatalf("refusal logged %d times, want once:\n%s", len(refusals), lb)
	}
	if refusals[0]["answer"] != "invalid_payload" || refusals[0]["status"] != float64(400) || refusals[0]["channel"] != "slack-webhook" {
		t.Errorf("refusal log = %v", refusals[0])
	}
	if strings.Contains(lb.String(), slackWebhookPath) {
		t.Errorf("log contains the webhook URL:\n%s", lb)
	}
}

const slackToken = "xoxb-1111-2222-abcdefghijklmnop"

func slackAPICheck(t *testing.T, r *http.Request, body []byte) {
	if r.URL.Path != "/api/chat.postMessage" {
		t.Errorf("slack api: path %q", r.URL.Path)
	}
	if ct := r.Header.Get("Content-Type"); ct != "application/x-www-form-urlencoded" {
		t.Errorf("slack api: Content-Type %q", ct)
	}
	form, err := url.ParseQuery(string(body))
	if err != nil {
		t.Errorf("slack api: form: %v", err)
		return
	}
	token := form.Get("token")
	if token == "" {
		token = strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	}
	if token != slackToken {
		t.Errorf("slack api: token %q", token)
	}
	if form.Get("channel") == "" {
		t.Errorf("slack api: no channel")
	}
	msg := map[string]any{"text": form.Get("text")}
	for _, k := range []string{"blocks", "attachments"} {
		if v := form.Get(k); v != "" {
			var x []any
			if err := json.Unmarshal([]byte(v), &x); err != nil {
				t.Errorf("slack api: %s is not a JSON array: %v", k, err)
			}
			msg[k] = x
		}
	}
	checkSlackMessage(t, msg)
}

func TestSlackAPIPostsToChannelWithToken(t *testing.T) {
	srv := newService(t, slackAPICheck, answer{status: 200, header: map[string]string{"Content-Type": "application/json"},
		body: `{"ok":true,"channel":"C0123","ts":"1700000000.000100"}`})
	h, _ := newHandler(t, notify.Config{SlackToken: slackToken, SlackChannel: "#images", SlackAPIURL: srv.URL + "/api/"}, nil)

	if err := handle(t, h, convertedEvent(t, "ev-api")); err != nil {
		t.Fatalf("Handle: %v", err)
	}
	reqs := srv.requests()
	if len(reqs) != 1 {
		t.Fatalf("slack api got %d requests", len(reqs))
	}
	form, _ := url.ParseQuery(string(reqs[0].body))
	if form.Get("channel") != "#images" {
		t.Errorf("channel = %q", form.Get("channel"))
	}
	if !strings.Contains(form.Get("text"), "uploads/disks/win11.vhdx is ready at images/disks/win11.vhdx.raw") {
		t.Errorf("text = %q", form.Get("text"))
	}
	if !strings.Contains(form.Get("attachments"), `"color":"good"`) {
		t.Errorf("attachments = %s", form.Get("attachments"))
	}
}

func TestSlackAPIChannelNotFoundIsNotRetried(t *testing.T) {
	srv := newService(t, slackAPICheck, answer{status: 200, header: map[string]string{"Content-Type": "application/json"},
		body: `{"ok":false,"error":"channel_not_found"}`})
	h, lb := newHandler(t, notify.Config{SlackToken: slackToken, SlackChannel: "#nope", SlackAPIURL: srv.URL + "/api/"}, nil)

	for range 2 {
		if err := handle(t, h, failedEvent(t, "ev-api-404", false)); err != nil {
			t.Fatalf("Handle: %v", err)
		}
	}
	if srv.count() != 1 {
		t.Errorf("slack api got %d requests, want 1", srv.count())
	}
	refusals := lb.lines(t, "channel refused the notification; not retrying")
	if len(refusals) != 1 || refusals[0]["answer"] != "channel_not_found" {
		t.Errorf("refusals = %v", refusals)
	}
	if strings.Contains(lb.String(), slackToken) {
		t.Errorf("log contains the token:\n%s", lb)
	}
}

func TestSlackAPIHonoursRetryAfter(t *testing.T) {
	srv := newService(t, slackAPICheck,
		answer{status: http.StatusTooManyRequests, header: map[string]string{"Retry-After": "1"}},
		answer{status: 200, header: map[string]string{"Content-Type": "application/json"}, body: `{"ok":true,"channel":"C1","ts":"1.2"}`})
	h, _ := newHandler(t, notify.Config{SlackToken: slackToken, SlackChannel: "C1", SlackAPIURL: srv.URL + "/api/"}, nil)
	if err := handle(t, h, convertedEvent(t, "ev-api-429")); err != nil {
		t.Fatalf("Handle: %v", err)
	}
	reqs := srv.requests()
	if len(reqs) != 2 || reqs[1].at.Sub(reqs[0].at) < time.Second {
		t.Errorf("got %d requests; want a second one at least 1s after the 429", len(reqs))
	}
}
