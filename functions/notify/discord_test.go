package notify_test

import (
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/notify"
	"github.com/imagepipe/imagepipe/internal/failure"
)

type discordWire struct {
	Content         *string `json:"content"`
	Username        string  `json:"username"`
	AllowedMentions *struct {
		Parse []string `json:"parse"`
	} `json:"allowed_mentions"`
	Embeds []struct {
		Title       string `json:"title"`
		Description string `json:"description"`
		Color       *int   `json:"color"`
		Timestamp   string `json:"timestamp"`
		Footer      *struct {
			Text string `json:"text"`
		} `json:"footer"`
		Fields []struct {
			Name   string `json:"name"`
			Value  string `json:"value"`
			Inline bool   `json:"inline"`
		} `json:"fields"`
	} `json:"embeds"`
}

// discordCheck applies Discord's webhook rules: JSON, content or embeds, at
// most 10 embeds, and the embed limits, counted in characters.
func discordCheck(t *testing.T, r *http.Request, body []byte) {
	if r.Method != http.MethodPost || r.Header.Get("Content-Type") != "application/json" {
		t.Errorf("discord: %s with Content-Type %q", r.Method, r.Header.Get("Content-Type"))
	}
	if !utf8.Valid(body) {
		t.Errorf("discord: body is not valid UTF-8")
	}
	var p discordWire
	if err := json.Unmarshal(body, &p); err != nil {
		t.Errorf("discord: body is not JSON: %v", err)
		return
	}
	if (p.Content == nil || *p.Content == "") && len(p.Embeds) == 0 {
		t.Errorf("discord: neither content nor embeds")
	}
	if len(p.Embeds) > 10 {
		t.Errorf("discord: %d embeds", len(p.Embeds))
	}
	rc := utf8.RuneCountInString
	total := 0
	for _, e := range p.Embeds {
		if rc(e.Title) > 256 || rc(e.Description) > 4096 || len(e.Fields) > 25 {
			t.Errorf("discord: title %d, description %d, fields %d", rc(e.Title), rc(e.Description), len(e.Fields))
		}
		if e.Timestamp != "" {
			if _, err := time.Parse(time.RFC3339, e.Timestamp); err != nil {
				t.Errorf("discord: timestamp %q is not ISO 8601", e.Timestamp)
			}
		}
		if e.Color != nil && (*e.Color < 0 || *e.Color > 0xFFFFFF) {
			t.Errorf("discord: color %d", *e.Color)
		}
		total += rc(e.Title) + rc(e.Description)
		if e.Footer != nil {
			if rc(e.Footer.Text) > 2048 {
				t.Errorf("discord: footer %d", rc(e.Footer.Text))
			}
			total += rc(e.Footer.Text)
		}
		for _, f := range e.Fields {
			if strings.TrimSpace(f.Name) == "" || strings.TrimSpace(f.Value) == "" {
				t.Errorf("discord: empty field %+v", f)
			}
			if rc(f.Name) > 256 || rc(f.Value) > 1024 {
				t.Errorf("discord: field name %d, value %d", rc(f.Name), rc(f.Value))
			}
			total += rc(f.Name) + rc(f.Value)
		}
	}
	if total > 6000 {
		t.Errorf("discord: embeds total %d characters, at most 6000", total)
	}
}

func decodeDiscord(t *testing.T, body []byte) discordWire {
	t.Helper()
	var p discordWire
	if err := json.Unmarshal(body, &p); err != nil {
		t.Fatal(err)
	}
	return p
}

const discordPath = "/api/webhooks/112233445566778899/aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"

func TestDiscordPostsEmbedWithFacts(t *testing.T) {
	srv := newService(t, discordCheck, answer{status: http.StatusNoContent})
	h, _ := newHandler(t, notify.Config{DiscordWebhookURL: srv.URL + discordPath}, nil)
	if err := handle(t, h, failedEvent(t, "ev-d", false)); err != nil {
		t.Fatalf("Handle: %v", err)
	}
	p := decodeDiscord(t, srv.requests()[0].body)
	if p.AllowedMentions == nil || len(p.AllowedMentions.Parse) != 0 {
		t.Errorf("allowed_mentions = %+v, want mentions disabled", p.AllowedMentions)
	}
	e := p.Embeds[0]
	if e.Title != "Failed to convert disks/evil.qcow2" || *e.Color != 0xE01E5A || e.Timestamp != "2026-11-23T07:45:27Z" {
		t.Errorf("embed title %q color %#x timestamp %q", e.Title, *e.Color, e.Timestamp)
	}
	fields := map[string]string{}
	for _, f := range e.Fields {
		fields[f.Name] = f.Value
	}
	// Values are escaped for Discord's markdown; they render as written.
	for k, v := range map[string]string{
		"Image": "uploads/disks/evil.qcow2", "Phase": "inspect", "Input": "qcow2",
		"Error": `the image names a backing file \(/etc/shadow\)`, "Rule": `no\-backing\-file`,
		"Suggestion": `Flatten the image with qemu\-img convert before uploading it.`,
	} {
		if fields[k] != v {
			t.Errorf("field %q = %q, want %q", k, fields[k], v)
		}
	}
	if !strings.Contains(e.Footer.Text, "ev-d") {
		t.Errorf("footer %q lacks the event id", e.Footer.Text)
	}
}

func TestDiscordEmbedIsTruncatedWithinLimits(t *testing.T) {
	srv := newService(t, discordCheck, answer{status: http.StatusNoContent})
	h, _ := newHandler(t, notify.Config{DiscordWebhookURL: srv.URL + discordPath}, nil)
	// Multi-byte runes everywhere: a byte-based cut would split them and a
	// byte-based count would be off by a factor of three.
	long := strings.Repeat("日本語ディスク", 800)
	ev := mustEvent(t, "ev-long", events.TypeFailed, "x", events.Failed{
		JobID: "j", InputBucket: "uploads", InputKey: long + ".vhdx", Phase: events.PhaseConvert,
		Message: strings.Repeat("qemu-img: ошибка чтения сектора; ", 400), Suggestion: long,
	})
	if err := handle(t, h, ev); err != nil {
		t.Fatalf("Handle: %v", err)
	}
	e := decodeDiscord(t, srv.requests()[0].body).Embeds[0]
	if !strings.HasSuffix(e.Title, "…") || utf8.RuneCountInString(e.Title) != 256 {
		t.Errorf("title has %d characters, want 256 ending in an ellipsis", utf8.RuneCountInString(e.Title))
	}
	var phase bool
	for _, f := range e.Fields {
		phase = phase || (f.Name == "Phase" && f.Value == "convert")
	}
	if !phase {
		t.Errorf("the short facts did not survive truncation: %+v", e.Fields)
	}
}

func TestDiscordHonoursRetryAfter(t *testing.T) {
	srv := newService(t, discordCheck,
		answer{status: http.StatusTooManyRequests, header: map[string]string{"Retry-After": "0.5", "Content-Type": "application/json"},
			body: `{"message": "You are being rate limited.", "retry_after": 0.5, "global": false}`},
		answer{status: http.StatusNoContent})
	h, _ := newHandler(t, notify.Config{DiscordWebhookURL: srv.URL + discordPath}, nil)
	if err := handle(t, h, convertedEvent(t, "ev-d429")); err != nil {
		t.Fatalf("Handle: %v", err)
	}
	reqs := srv.requests()
	if len(reqs) != 2 {
		t.Fatalf("discord got %d requests, want 2", len(reqs))
	}
	if gap := reqs[1].at.Sub(reqs[0].at); gap < 500*time.Millisecond {
		t.Errorf("retried after %s, before the 0.5s Retry-After", gap)
	}
}

func TestDiscordRetryAfterInTheBodyOnlyIsHonoured(t *testing.T) {
	// Discord's rate-limit answers carry the wait in the JSON body; a proxy
	// in front may drop the header.
	srv := newService(t, discordCheck,
		answer{status: http.StatusTooManyRequests, header: map[string]string{"Content-Type": "application/json"},
			body: `{"message": "You are being rate limited.", "retry_after": 64.57, "global": false}`},
		answer{status: http.StatusNoContent})
	h, _ := newHandler(t, notify.Config{DiscordWebhookURL: srv.URL + discordPath, HTTPTimeout: 2 * time.Second}, nil)
	err := handle(t, h, convertedEvent(t, "ev-dbody"))
	var de *notify.DeliveryError
	if !errors.As(err, &de) || de.Status != http.StatusTooManyRequests || de.RetryAfter != 64570*time.Millisecond {
		t.Fatalf("Handle = %v, want a retryable 429 carrying the body's 64.57s wait", err)
	}
	if failure.IsPermanent(err) {
		t.Fatalf("Handle = %v, want retryable", err)
	}
}

func TestDiscordServerErrorIsRetryableAndBadRequestIsNot(t *testing.T) {
	tests := []struct {
		status    int
		body      string
		retryable bool
	}{
		{http.StatusInternalServerError, `{"message": "500: Internal Server Error", "code": 0}`, true},
		{http.StatusBadGateway, "bad gateway", true},
		{http.StatusRequestTimeout, "", true},
		{http.StatusBadRequest, `{"message": "Invalid Form Body", "code": 50035}`, false},
		{http.StatusNotFound, `{"message": "Unknown Webhook", "code": 10015}`, false},
	}
	for _, tc := range tests {
		t.Run(http.StatusText(tc.status), func(t *testing.T) {
			srv := newService(t, discordCheck, answer{status: tc.status, body: tc.body})
			h, lb := newHandler(t, notify.Config{DiscordWebhookURL: srv.URL + discordPath}, nil)
			err := handle(t, h, convertedEvent(t, "ev"))
			if tc.retryable {
				if err == nil || failure.IsPermanent(err) {
					t.Fatalf("Handle = %v, want retryable", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Handle = %v, want nil (refused for good)", err)
			}
			refusals := lb.lines(t, "channel refused the notification; not retrying")
			if len(refusals) != 1 || refusals[0]["answer"] != tc.body {
				t.Errorf("refusals = %v", refusals)
			}
			if strings.Contains(lb.String(), "aBcDeFgHiJkLmNoPqRsTuVwXyZ") {
				t.Errorf("log holds the webhook token:\n%s", lb)
			}
		})
	}
}
