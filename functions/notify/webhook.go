package notify

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// SignatureHeader carries the webhook body's HMAC. The scheme (a timestamp
// bound into the MAC, "v1" naming the algorithm) is the one Stripe
// popularised, so receivers can reuse code they already trust.
const SignatureHeader = "Imagepipe-Signature"

// EventIDHeader repeats the CloudEvent's id outside the body.
const EventIDHeader = "Imagepipe-Event-Id"

// CloudEventsContentType is the media type of a structured-mode CloudEvent.
const CloudEventsContentType = "application/cloudevents+json"

// Signature verification errors, for receivers that answer differently to a
// stale request than to a forged one.
var (
	ErrSignatureMissing  = errors.New("signature header missing or malformed")
	ErrSignatureExpired  = errors.New("signature timestamp outside tolerance")
	ErrSignatureMismatch = errors.New("signature does not match body")
)

// Sign returns the Imagepipe-Signature header value for body sent at t.
func Sign(secret string, body []byte, t time.Time) string {
	ts := strconv.FormatInt(t.Unix(), 10)
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac(secret, ts, body))
}

func mac(secret, ts string, body []byte) []byte {
	h := hmac.New(sha256.New, []byte(secret))
	h.Write([]byte(ts))
	h.Write([]byte{'.'})
	h.Write(body)
	return h.Sum(nil)
}

// VerifySignature checks an Imagepipe-Signature header against the raw
// request body. The timestamp must be within tolerance of now, which stops a
// captured request from being replayed later; several v1 values are accepted
// so a sender can sign with an old and a new secret while it is rotated.
func VerifySignature(secret string, header string, body []byte, now time.Time, tolerance time.Duration) error {
	var (
		ts   string
		sigs [][]byte
	)
	for part := range strings.SplitSeq(header, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			continue
		}
		switch k {
		case "t":
			ts = v
		case "v1":
			if b, err := hex.DecodeString(v); err == nil && len(b) == sha256.Size {
				sigs = append(sigs, b)
			}
		}
	}
	unix, err := strconv.ParseInt(ts, 10, 64)
	if err != nil || len(sigs) == 0 {
		return ErrSignatureMissing
	}
	if d := now.Sub(time.Unix(unix, 0)); d > tolerance || d < -tolerance {
		return fmt.Errorf("%w: signed %s ago", ErrSignatureExpired, d.Round(time.Second))
	}
	want := mac(secret, ts, body)
	for _, s := range sigs {
		if hmac.Equal(s, want) {
			return nil
		}
	}
	return ErrSignatureMismatch
}

// webhook POSTs the CloudEvent itself, so a receiver gets exactly what a
// NATS subscriber would.
type webhook struct {
	url    string
	secret string
	client *http.Client
	r      *redactor
	now    func() time.Time
}

func (w *webhook) Name() string { return "webhook" }

func (w *webhook) Send(ctx context.Context, m Message) error {
	body, err := json.Marshal(m.Event)
	if err != nil {
		return &DeliveryError{Channel: w.Name(), Permanent: true, reason: "encode event: " + err.Error()}
	}
	h := http.Header{}
	// The id lets a receiver drop a repeat without parsing the body; a
	// redelivered result that got past the ledger carries the same id.
	h.Set(EventIDHeader, m.Event.ID)
	if w.secret != "" {
		h.Set(SignatureHeader, Sign(w.secret, body, w.now()))
	}
	return postJSON(ctx, w.client, w.Name(), w.url, CloudEventsContentType, body, h, w.r)
}
