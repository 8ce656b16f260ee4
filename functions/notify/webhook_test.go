package notify_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/notify"
)

const webhookSecret = "whsec-test-5c2f0a"

func TestWebhookPostsSignedCloudEvent(t *testing.T) {
	srv := newService(t, func(t *testing.T, r *http.Request, body []byte) {
		if err := notify.VerifySignature(webhookSecret, r.Header.Get(notify.SignatureHeader), body, time.Now(), 5*time.Minute); err != nil {
			t.Errorf("receiver: signature: %v", err)
		}
	})
	h, _ := newHandler(t, notify.Config{WebhookURL: srv.URL + "/hooks/imagepipe?token=abc123456", WebhookSecret: webhookSecret}, nil)
	ev := convertedEvent(t, "ev-wh")
	if err := handle(t, h, ev); err != nil {
		t.Fatalf("Handle: %v", err)
	}
	req := srv.requests()[0]
	if ct := req.header.Get("Content-Type"); ct != "application/cloudevents+json" {
		t.Errorf("Content-Type = %q", ct)
	}
	if id := req.header.Get("Imagepipe-Event-Id"); id != "ev-wh" {
		t.Errorf("Imagepipe-Event-Id = %q", id)
	}
	sig := req.header.Get("Imagepipe-Signature")
	if !strings.HasPrefix(sig, "t=") || !strings.Contains(sig, ",v1=") {
		t.Errorf("Imagepipe-Signature = %q", sig)
	}
	got, err := events.Decode(req.body)
	if err != nil {
		t.Fatalf("receiver cannot decode the CloudEvent: %v", err)
	}
	var c events.Converted
	if err := got.DecodeData(events.TypeConverted, &c); err != nil {
		t.Fatal(err)
	}
	if got.ID != ev.ID || got.Subject != "disks/win11.vhdx" || !got.Time.Equal(ev.Time) || c.OutputKey != "disks/win11.vhdx.raw" || c.SHA256 == "" {
		t.Errorf("receiver got %+v / %+v", got, c)
	}
	var raw map[string]any
	_ = json.Unmarshal(req.body, &raw)
	if raw["specversion"] != "1.0" || raw["type"] != events.TypeConverted {
		t.Errorf("body attributes = %v", raw)
	}
}

func TestWebhookWithoutSecretIsUnsigned(t *testing.T) {
	srv := newService(t, nil)
	h, _ := newHandler(t, notify.Config{WebhookURL: srv.URL}, nil)
	if err := handle(t, h, convertedEvent(t, "ev")); err != nil {
		t.Fatal(err)
	}
	if sig := srv.requests()[0].header.Get("Imagepipe-Signature"); sig != "" {
		t.Errorf("unexpected signature %q", sig)
	}
}

func TestVerifySignature(t *testing.T) {
	body := []byte(`{"specversion":"1.0","id":"ev-1"}`)
	now := time.Unix(1_790_000_000, 0)
	good := notify.Sign(webhookSecret, body, now)
	tests := []struct {
		name   string
		secret string
		header string
		body   []byte
		now    time.Time
		want   error
	}{
		{"good", webhookSecret, good, body, now, nil},
		{"good within tolerance", webhookSecret, good, body, now.Add(4 * time.Minute), nil},
		{"tampered body", webhookSecret, good, []byte(`{"specversion":"1.0","id":"ev-2"}`), now, notify.ErrSignatureMismatch},
		{"wrong secret", "other", good, body, now, notify.ErrSignatureMismatch},
		{"replayed old timestamp", webhookSecret, good, body, now.Add(10 * time.Minute), notify.ErrSignatureExpired},
		{"timestamp from the future", webhookSecret, good, body, now.Add(-10 * time.Minute), notify.ErrSignatureExpired},
		{"timestamp rewritten to now", webhookSecret, strings.Replace(good, fmt.Sprint(now.Unix()), fmt.Sprint(now.Add(10*time.Minute).Unix()), 1), body, now.Add(10 * time.Minute), notify.ErrSignatureMismatch},
		{"rotated secret, second v1 matches", webhookSecret, notify.Sign("old", body, now) + "," + strings.Split(good, ",")[1], body, now, nil},
		{"missing", webhookSecret, "", body, now, notify.ErrSignatureMissing},
		{"no v1", webhookSecret, fmt.Sprintf("t=%d", now.Unix()), body, now, notify.ErrSignatureMissing},
		{"garbage", webhookSecret, "t=abc,v1=zz", body, now, notify.ErrSignatureMissing},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := notify.VerifySignature(tc.secret, tc.header, tc.body, tc.now, 5*time.Minute)
			if !errors.Is(err, tc.want) || (tc.want == nil) != (err == nil) {
				t.Errorf("VerifySignature = %v, want %v", err, tc.want)
			}
		})
	}
}

func TestSignMatchesDocumentedScheme(t *testing.T) {
	// The README tells receivers: hex(HMAC-SHA256(secret, "<t>.<body>")).
	// The expected value was computed outside Go with
	//   printf '1790000000.{}' | openssl dgst -sha256 -hmac whsec-test-5c2f0a
	got := notify.Sign(webhookSecret, []byte("{}"), time.Unix(1_790_000_000, 0))
	want := "t=1790000000,v1=3acb2e3d19b33f3ce96c10bed78c86590c0fc451b63cce771936721b8b96c5d8"
	if got != want {
		t.Errorf("Sign = %q, want %q", got, want)
	}
}
