package notify

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
)

// Channel delivers one message somewhere.
type Channel interface {
	Name() string
	Send(ctx context.Context, m Message) error
}

// Option adjusts a Handler beyond what the environment configures: things a
// program or test supplies, not an operator.
type Option func(*options)

type options struct {
	smtpTLS  *tls.Config
	extra    []extraChannel
	recorder func(channel, outcome string)
}

type extraChannel struct {
	ch Channel
	on []string
}

// WithChannel adds a channel the environment cannot describe. on narrows
// IMAGEPIPE_NOTIFY_ON for it the way IMAGEPIPE_SLACK_ON does for Slack; its
// Name must be unique and stable, since the ledger records deliveries by it.
func WithChannel(ch Channel, on ...string) Option {
	return func(o *options) { o.extra = append(o.extra, extraChannel{ch: ch, on: on}) }
}

// WithDeliveryRecorder is told the outcome of every delivery attempt:
// "delivered", "refused" (permanent) or "retry", for metrics.
func WithDeliveryRecorder(record func(channel, outcome string)) Option {
	return func(o *options) { o.recorder = record }
}

// WithSMTPTLSConfig sets the TLS configuration for SMTP, typically to trust a
// private CA. Its ServerName defaults to the SMTP host.
func WithSMTPTLSConfig(c *tls.Config) Option {
	return func(o *options) { o.smtpTLS = c }
}

// Defaults for a Config built in code rather than parsed from the
// environment.
const (
	DefaultHTTPTimeout = 10 * time.Second
	DefaultStallAfter  = 60 * time.Minute
)

type route struct {
	ch     Channel
	routes routes
}

// Handler relays result events to the configured channels.
type Handler struct {
	channels []route
	ledger   Ledger
	log      *slog.Logger
	timeout  time.Duration
	record   func(channel, outcome string)
}

// NewHandler builds the channels the configuration enables. httpClient is
// shared by the HTTP channels; nil means a client with cfg.HTTPTimeout. A
// nil ledger remembers deliveries in memory only.
func NewHandler(cfg Config, ledger Ledger, log *slog.Logger, httpClient *http.Client, opts ...Option) (*Handler, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if cfg.HTTPTimeout <= 0 {
		cfg.HTTPTimeout = DefaultHTTPTimeout
	}
	if httpClient == nil {
		httpClient = &http.Client{Timeout: cfg.HTTPTimeout}
	}
	if ledger == nil {
		ledger = &memoryLedger{}
	}
	global, err := parseClasses("IMAGEPIPE_NOTIFY_ON", cfg.NotifyOn)
	if err != nil {
		return nil, err
	}
	r := newRedactor(cfg.SlackWebhookURL, cfg.SlackToken, cfg.DiscordWebhookURL, cfg.WebhookURL, cfg.WebhookSecret, cfg.SMTPPassword)

	h := &Handler{ledger: ledger, log: log, timeout: cfg.HTTPTimeout, record: o.recorder}
	if h.record == nil {
		h.record = func(string, string) {}
	}
	add := func(envName string, own []string, ch Channel) error {
		rt, ignored, err := narrow(global, envName, own)
		if err != nil {
			return err
		}
		if len(ignored) > 0 {
			log.Warn("channel asks for classes IMAGEPIPE_NOTIFY_ON does not enable; they are ignored",
				"channel", ch.Name(), "variable", envName, "ignored", strings.Join(ignored, ","))
		}
		h.channels = append(h.channels, route{ch: ch, routes: rt})
		return nil
	}

	if cfg.SlackWebhookURL != "" {
		if err := checkURL("IMAGEPIPE_SLACK_WEBHOOK_URL", cfg.SlackWebhookURL); err != nil {
			return nil, err
		}
		if err := add("IMAGEPIPE_SLACK_ON", cfg.SlackOn, &slackWebhook{hookTarget{url: cfg.SlackWebhookURL, client: recordingClient(httpClient), r: r}}); err != nil {
			return nil, err
		}
	}
	if cfg.SlackToken != "" || cfg.SlackChannel != "" {
		if cfg.SlackToken == "" || cfg.SlackChannel == "" {
			return nil, errors.New("IMAGEPIPE_SLACK_TOKEN and IMAGEPIPE_SLACK_CHANNEL go together")
		}
		if cfg.SlackAPIURL != "" {
			if err := checkURL("IMAGEPIPE_SLACK_API_URL", cfg.SlackAPIURL); err != nil {
				return nil, err
			}
		}
		if err := add("IMAGEPIPE_SLACK_ON", cfg.SlackOn, newSlackAPI(cfg.SlackToken, cfg.SlackChannel, cfg.SlackAPIURL, recordingClient(httpClient), r)); err != nil {
			return nil, err
		}
	}
	if cfg.DiscordWebhookURL != "" {
		if err := checkURL("IMAGEPIPE_DISCORD_WEBHOOK_URL", cfg.DiscordWebhookURL); err != nil {
			return nil, err
		}
		if err := add("IMAGEPIPE_DISCORD_ON", cfg.DiscordOn, &discordWebhook{hookTarget{url: cfg.DiscordWebhookURL, client: httpClient, r: r}}); err != nil {
			return nil, err
		}
	}
	if cfg.WebhookURL != "" {
		if err := checkURL("IMAGEPIPE_WEBHOOK_URL", cfg.WebhookURL); err != nil {
			return nil, err
		}
		if err := add("IMAGEPIPE_WEBHOOK_ON", cfg.WebhookOn, &webhook{url: cfg.WebhookURL, secret: cfg.WebhookSecret, client: httpClient, r: r, now: time.Now}); err != nil {
			return nil, err
		}
	}
	if cfg.SMTPAddr != "" {
		emails, err := newEmails(cfg, o.smtpTLS, r)
		if err != nil {
			return nil, err
		}
		for _, e := range emails {
			if err := add("IMAGEPIPE_EMAIL_ON", cfg.EmailOn, e); err != nil {
				return nil, err
			}
		}
	}

	for _, x := range o.extra {
		for _, c := range h.channels {
			if c.ch.Name() == x.ch.Name() {
				return nil, fmt.Errorf("two notification channels named %q", x.ch.Name())
			}
		}
		if err := add(x.ch.Name()+" routing", x.on, x.ch); err != nil {
			return nil, err
		}
	}

	if len(h.channels) == 0 {
		log.Info("no notification channel configured; results are logged only")
	}
	for _, c := range h.channels {
		log.Info("notification channel configured", "channel", c.ch.Name(), "on", c.routes.String())
	}
	return h, nil
}

func (r routes) String() string {
	var on []string
	for _, c := range []string{OnSuccess, OnFailure, OnStalled} {
		if r[c] {
			on = append(on, c)
		}
	}
	if len(on) == 0 {
		return "nothing"
	}
	return strings.Join(on, ",")
}

// Handle logs one result or queue alert and sends it to every channel whose
// routing takes it. Channels run side by side, so a slow or failing one
// delays no other. It returns nil once every routed channel has the message
// or has refused it for good; a retryable failure of any channel makes it
// return a retryable error, and the redelivery tries only the channels the
// ledger does not list yet.
func (h *Handler) Handle(ctx context.Context, ev events.Event) error {
	m, worthTelling, err := render(ev)
	if err != nil {
		return failure.Permanent(events.PhasePublish, err, "only imagepipe results and queue alerts belong on this consumer")
	}
	log := h.log.With(logAttrs(m)...)
	if m.Outcome == OutcomeStalled || m.Outcome == OutcomeRecovered {
		log.Info("queue alert")
	} else {
		log.Info("result")
	}
	if !worthTelling {
		log.Debug("not notifying: the job will be retried")
		return nil
	}
	class := m.Outcome.Class()

	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	for _, c := range h.channels {
		if !c.routes[class] {
			continue
		}
		wg.Go(func() {
			if err := h.deliver(ctx, log, c.ch, m); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if len(errs) > 0 {
		return failure.Retryable(events.PhasePublish, errors.Join(errs...),
			"the notification will be retried; check the channel's endpoint and credentials")
	}
	return nil
}

// deliver sends m on one channel unless the ledger says it already went. It
// returns an error only when a later attempt could succeed.
func (h *Handler) deliver(ctx context.Context, log *slog.Logger, ch Channel, m Message) error {
	log = log.With("channel", ch.Name())
	done, err := h.ledger.Delivered(ctx, m.EventID, ch.Name())
	if err != nil {
		// Sending without knowing risks a double post; a retry of the
		// whole event costs only a delay.
		return fmt.Errorf("%s: %w", ch.Name(), err)
	}
	if done {
		log.Debug("already delivered")
		return nil
	}

	err = h.sendHonouringRetryAfter(ctx, ch, m)
	var de *DeliveryError
	switch {
	case err == nil:
		h.record(ch.Name(), "delivered")
		log.Debug("delivered")
	case errors.As(err, &de) && de.Permanent:
		h.record(ch.Name(), "refused")
		// Logged once, and recorded as done: repeating a request the
		// service has refused only fills the log.
		log.Error("channel refused the notification; not retrying", "status", de.Status, "answer", de.Answer, "err", de.Error())
	default:
		h.record(ch.Name(), "retry")
		log.Warn("notification not delivered; will retry", "err", err.Error())
		return err
	}
	if err := h.ledger.MarkDelivered(ctx, m.EventID, ch.Name()); err != nil {
		// The message is out; failing the event now would post it again
		// on redelivery, which is worse than a rare missed record.
		log.Warn("delivered but not recorded in the ledger", "err", err.Error())
	}
	return nil
}

// sendHonouringRetryAfter makes one attempt, and another after the wait a
// rate-limited service asks for, as long as the waiting fits in the timeout
// budget; a longer wait goes back to the runtime as a retryable error so the
// message is not held.
func (h *Handler) sendHonouringRetryAfter(ctx context.Context, ch Channel, m Message) error {
	budget := time.Now().Add(h.timeout)
	for {
		attemptCtx, cancel := context.WithTimeout(ctx, h.timeout)
		err := ch.Send(attemptCtx, m)
		cancel()
		var de *DeliveryError
		if err == nil || !errors.As(err, &de) || de.Permanent || de.RetryAfter <= 0 {
			return err
		}
		if time.Now().Add(de.RetryAfter).After(budget) {
			return err
		}
		t := time.NewTimer(de.RetryAfter)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
	}
}

func logAttrs(m Message) []any {
	attrs := []any{"event", m.EventID, "outcome", string(m.Outcome)}
	switch m.Outcome {
	case OutcomeConverted:
		var c events.Converted
		_ = m.Event.DecodeData(events.TypeConverted, &c)
		attrs = append(attrs, "job", c.JobID, "bucket", c.InputBucket, "key", c.InputKey,
			"output_bucket", c.OutputBucket, "output_key", c.OutputKey)
	case OutcomeFailed:
		var f events.Failed
		_ = m.Event.DecodeData(events.TypeFailed, &f)
		attrs = append(attrs, "job", f.JobID, "bucket", f.InputBucket, "key", f.InputKey,
			"stage", string(f.Phase), "error", f.Message, "will_retry", f.WillRetry)
	default:
		var a QueueAlert
		_ = m.Event.DecodeData(m.Event.Type, &a)
		attrs = append(attrs, "stream", a.Stream, "consumer", a.Consumer,
			"queue_depth", a.QueueDepth, "idle_minutes", a.IdleMinutes)
	}
	return attrs
}
