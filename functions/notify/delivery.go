package notify

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"
)

// DeliveryError is one channel's failure to deliver a message. Its text is
// already stripped of webhook URLs, tokens and passwords, so it can be logged
// and returned as is.
type DeliveryError struct {
	Channel string
	// Status is the HTTP status or SMTP reply code, 0 when there was no
	// answer (network error, timeout).
	Status int
	// Answer is the start of what the service said, redacted.
	Answer string
	// RetryAfter is how long the service asked us to wait, if it did.
	RetryAfter time.Duration
	// Permanent means the same request will never succeed: the channel's
	// configuration or the payload is wrong.
	Permanent bool
	reason    string
}

func (e *DeliveryError) Error() string {
	var b strings.Builder
	b.WriteString(e.Channel)
	b.WriteString(": ")
	b.WriteString(e.reason)
	if e.Status != 0 {
		fmt.Fprintf(&b, " (status %d)", e.Status)
	}
	if e.Answer != "" {
		fmt.Fprintf(&b, ": %q", e.Answer)
	}
	if e.RetryAfter > 0 {
		fmt.Fprintf(&b, ", retry after %s", e.RetryAfter)
	}
	return b.String()
}

// retryableStatus is the HTTP statuses a later attempt can fix; every other
// 4xx means the request itself is wrong.
func retryableStatus(code int) bool {
	return code == http.StatusRequestTimeout || code == http.StatusTooManyRequests || code >= 500
}

// maxAnswer bounds how much of a service's reply is kept for the log.
const maxAnswer = 512

// redactor removes secrets from text before it reaches a log line or an
// error: Go's HTTP errors quote the full URL, and webhook URLs are bearer
// credentials.
type redactor struct{ secrets []string }

func newRedactor(secrets ...string) *redactor {
	r := &redactor{}
	for _, s := range secrets {
		if s == "" {
			continue
		}
		r.secrets = append(r.secrets, s)
		if u, err := url.Parse(s); err == nil && u.Host != "" {
			// The path and query of a webhook URL are its credential; they
			// also show up escaped or on their own in library errors.
			if p := strings.Trim(u.EscapedPath(), "/"); len(p) >= 8 {
				r.secrets = append(r.secrets, p)
			}
			if u.RawQuery != "" {
				r.secrets = append(r.secrets, u.RawQuery)
			}
			if pw, ok := u.User.Password(); ok && pw != "" {
				r.secrets = append(r.secrets, pw)
			}
		}
	}
	// Longest first, so a URL is replaced whole before its path is.
	for i := 1; i < len(r.secrets); i++ {
		for j := i; j > 0 && len(r.secrets[j]) > len(r.secrets[j-1]); j-- {
			r.secrets[j], r.secrets[j-1] = r.secrets[j-1], r.secrets[j]
		}
	}
	return r
}

func (r *redactor) redact(s string) string {
	for _, secret := range r.secrets {
		if u, err := url.Parse(secret); err == nil && u.Host != "" && u.Scheme != "" {
			s = strings.ReplaceAll(s, secret, redactedURL(u))
			continue
		}
		s = strings.ReplaceAll(s, secret, "[redacted]")
	}
	return s
}

// redactedURL keeps what helps an operator (which host) and drops what
// authorises (path, query, user info).
func redactedURL(u *url.URL) string {
	return u.Scheme + "://" + u.Host + "/[redacted]"
}

// answerText makes a service's reply safe and short enough for a log line.
func (r *redactor) answerText(b []byte) string {
	s := strings.TrimSpace(string(bytes.ToValidUTF8(b, []byte("?"))))
	s = r.redact(s)
	return truncateRunes(s, maxAnswer)
}

// parseRetryAfter reads a Retry-After header: seconds (Discord sends
// fractions) or an HTTP date.
func parseRetryAfter(v string, now time.Time) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if secs, err := strconv.ParseFloat(v, 64); err == nil {
		if secs <= 0 {
			return 0
		}
		return time.Duration(secs * float64(time.Second))
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return t.Sub(now)
	}
	return 0
}

// httpFailure classifies a non-2xx answer.
func httpFailure(channel string, resp *http.Response, body []byte, r *redactor) *DeliveryError {
	e := &DeliveryError{
		Channel:   channel,
		Status:    resp.StatusCode,
		Answer:    r.answerText(body),
		Permanent: !retryableStatus(resp.StatusCode),
		reason:    "rejected",
	}
	if !e.Permanent {
		e.reason = "unavailable"
	}
	if resp.StatusCode == http.StatusTooManyRequests {
		e.reason = "rate limited"
		e.RetryAfter = parseRetryAfter(resp.Header.Get("Retry-After"), time.Now())
		if e.RetryAfter == 0 {
			e.RetryAfter = retryAfterInBody(body)
		}
	}
	return e
}

// retryAfterInBody reads the wait Discord puts in its rate-limit answer,
// {"retry_after": seconds}, for when no Retry-After header made it through.
func retryAfterInBody(body []byte) time.Duration {
	var v struct {
		RetryAfter float64 `json:"retry_after"`
	}
	if json.Unmarshal(body, &v) != nil || v.RetryAfter <= 0 {
		return 0
	}
	return time.Duration(math.Round(v.RetryAfter*1000)) * time.Millisecond
}

// transportFailure describes an error that got no answer at all. Such
// failures are worth retrying: the network, DNS or the service may be back.
func transportFailure(channel string, err error, r *redactor) *DeliveryError {
	reason := "request failed: "
	if errors.Is(err, context.DeadlineExceeded) {
		reason = "timed out: "
	}
	return &DeliveryError{Channel: channel, reason: reason + r.redact(err.Error())}
}

// hookTarget is where a chat webhook posts: its URL, the client that
// posts, and what to redact from what the service answers.
type hookTarget struct {
	url    string
	client *http.Client
	r      *redactor
}

// postJSON sends one request and classifies the outcome. The body is read
// only far enough to explain a refusal.
func postJSON(ctx context.Context, client *http.Client, channel, endpoint, contentType string, body []byte, header http.Header, r *redactor) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, bytes.NewReader(body))
	if err != nil {
		return &DeliveryError{Channel: channel, Permanent: true, reason: "bad request: " + r.redact(err.Error())}
	}
	for k, vs := range header {
		req.Header[k] = vs
	}
	req.Header.Set("Content-Type", contentType)
	req.Header.Set("User-Agent", userAgent)
	resp, err := client.Do(req)
	if err != nil {
		return transportFailure(channel, err, r)
	}
	defer resp.Body.Close()
	answer, _ := io.ReadAll(io.LimitReader(resp.Body, 4*maxAnswer))
	// Drain a little more so the connection can be reused, but never
	// wait on an endless body.
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return nil
	}
	return httpFailure(channel, resp, answer, r)
}

const userAgent = "imagepipe-notify"

// answerRecorder keeps the body of an error response for a library (Slack's)
// that throws it away, so the log can say what the service objected to.
type answerRecorder struct {
	mu     sync.Mutex
	answer []byte
	header http.Header
}

type answerKey struct{}

func withAnswerRecorder(ctx context.Context) (context.Context, *answerRecorder) {
	rec := &answerRecorder{}
	return context.WithValue(ctx, answerKey{}, rec), rec
}

func (a *answerRecorder) get() ([]byte, http.Header) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.answer, a.header
}

// recordingTransport copies the start of every error response into the
// request's answerRecorder and leaves the response readable as before.
type recordingTransport struct{ base http.RoundTripper }

func (t recordingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(req)
	if err != nil || resp.StatusCode < 400 {
		return resp, err
	}
	rec, ok := req.Context().Value(answerKey{}).(*answerRecorder)
	if !ok {
		return resp, nil
	}
	head, _ := io.ReadAll(io.LimitReader(resp.Body, 4*maxAnswer))
	rec.mu.Lock()
	rec.answer, rec.header = head, resp.Header.Clone()
	rec.mu.Unlock()
	resp.Body = struct {
		io.Reader
		io.Closer
	}{io.MultiReader(bytes.NewReader(head), resp.Body), resp.Body}
	return resp, nil
}

// recordingClient returns a copy of c whose transport records error answers.
func recordingClient(c *http.Client) *http.Client {
	cp := *c
	base := cp.Transport
	if base == nil {
		base = http.DefaultTransport
	}
	cp.Transport = recordingTransport{base: base}
	return &cp
}

// truncateRunes shortens s to at most n runes, marking the cut with an
// ellipsis, and never splits a UTF-8 sequence.
func truncateRunes(s string, n int) string {
	if n <= 0 {
		return ""
	}
	if utf8.RuneCountInString(s) <= n {
		return s
	}
	if n == 1 {
		return "…"
	}
	i, count := 0, 0
	for i < len(s) && count < n-1 {
		_, size := utf8.DecodeRuneInString(s[i:])
		i += size
		count++
	}
	return s[:i] + "…"
}
