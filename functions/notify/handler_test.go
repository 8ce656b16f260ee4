package notify_test

import (
	"context"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caarlos0/env/v11"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/notify"
	"github.com/imagepipe/imagepipe/internal/failure"
)

func TestConfigDefaultsFromEnvironment(t *testing.T) {
	t.Setenv("IMAGEPIPE_SLACK_ON", "failure")
	t.Setenv("IMAGEPIPE_SMTP_TO", "a@example.test,b@example.test")
	cfg, err := env.ParseAs[notify.Config]()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(cfg.NotifyOn, ",") != "failure,stalled" || cfg.HTTPTimeout != 10*time.Second ||
		cfg.StallAfter != time.Hour || cfg.SMTPTLS != "auto" || cfg.SlackAPIURL != notify.DefaultSlackAPIURL {
		t.Errorf("defaults = %+v", cfg)
	}
	if strings.Join(cfg.SlackOn, ",") != "failure" || len(cfg.SMTPTo) != 2 {
		t.Errorf("lists = %v / %v", cfg.SlackOn, cfg.SMTPTo)
	}
}

func TestNewHandlerRefusesBadConfiguration(t *testing.T) {
	tests := map[string]notify.Config{
		"unknown class":           {NotifyOn: []string{"failure", "sucess"}},
		"unknown channel class":   {NotifyOn: []string{"failure"}, WebhookURL: "http://127.0.0.1:1/x", WebhookOn: []string{"failed"}},
		"token without channel":   {SlackToken: "xoxb-1"},
		"webhook not a URL":       {DiscordWebhookURL: "discord.com/api/webhooks/1/2"},
		"email without recipient": {SMTPAddr: "127.0.0.1:25", SMTPFrom: "a@example.test"},
		"email bad tls mode":      {SMTPAddr: "127.0.0.1:25", SMTPFrom: "a@example.test", SMTPTo: []string{"b@example.test"}, SMTPTLS: "maybe"},
	}
	for name, cfg := range tests {
		t.Run(name, func(t *testing.T) {
			if _, err := notify.NewHandler(cfg, nil, nil, nil); err == nil {
				t.Errorf("NewHandler accepted %+v", cfg)
			}
		})
	}
}

func TestEveryResultIsLoggedEvenWithoutChannels(t *testing.T) {
	log, lb := newLogger()
	h, err := notify.NewHandler(notify.Config{NotifyOn: []string{"failure", "stalled"}}, nil, log, nil)
	if err != nil {
		t.Fatal(err)
	}
	if n := len(lb.lines(t, "no notification channel configured; results are logged only")); n != 1 {
		t.Errorf("no-channel notice logged %d times, want once", n)
	}
	for _, ev := range []events.Event{convertedEvent(t, "a"), failedEvent(t, "b", false), failedEvent(t, "c", true)} {
		if err := handle(t, h, ev); err != nil {
			t.Fatalf("Handle(%s): %v", ev.ID, err)
		}
	}
	results := lb.lines(t, "result")
	if len(results) != 3 {
		t.Fatalf("logged %d result lines, want 3:\n%s", len(results), lb)
	}
	want := []map[string]any{
		{"event": "a", "outcome": "converted", "job": "7d0c1e55-6f7e-5a0b-9d55-0b0e3c1f2a11", "bucket": "uploads", "key": "disks/win11.vhdx", "output_key": "disks/win11.vhdx.raw"},
		{"event": "b", "outcome": "failed", "job": "1b2c3d4e-0000-5000-8000-000000000001", "bucket": "uploads", "key": "disks/evil.qcow2", "stage": "inspect", "will_retry": false},
		{"event": "c", "outcome": "failed", "will_retry": true},
	}
	for i, w := range want {
		for k, v := range w {
			if results[i][k] != v {
				t.Errorf("result %d: %s = %v, want %v", i, k, results[i][k], v)
			}
		}
	}
	if n := len(lb.lines(t, "no notification channel configured; results are logged only")); n != 1 {
		t.Errorf("no-channel notice repeated per result")
	}
}

func TestRetriedFailureIsLoggedNotNotified(t *testing.T) {
	srv := newService(t, nil)
	h, lb := newHandler(t, notify.Config{WebhookURL: srv.URL}, nil)
	if err := handle(t, h, failedEvent(t, "ev-retry", true)); err != nil {
		t.Fatal(err)
	}
	if srv.count() != 0 {
		t.Errorf("a failure that will be retried was sent %d times", srv.count())
	}
	if rs := lb.lines(t, "result"); len(rs) != 1 || rs[0]["will_retry"] != true {
		t.Errorf("result lines = %v", rs)
	}
}

func TestUnknownEventTypeIsPermanent(t *testing.T) {
	h, _ := newHandler(t, notify.Config{}, nil)
	err := handle(t, h, mustEvent(t, "x", events.TypeProgress, "k", events.Progress{}))
	if !failure.IsPermanent(err) {
		t.Errorf("Handle = %v, want a permanent error", err)
	}
	err = handle(t, h, events.Event{SpecVersion: "1.0", ID: "y", Source: "s", Type: events.TypeConverted, Data: []byte(`"not an object"`)})
	if !failure.IsPermanent(err) {
		t.Errorf("Handle(bad data) = %v, want a permanent error", err)
	}
}

func TestRoutingFollowsNotifyOnAndPerChannelNarrowing(t *testing.T) {
	type sent struct{ slack, webhook int }
	tests := []struct {
		name     string
		notifyOn []string
		slackOn  []string
		want     map[string]sent // event kind -> deliveries
	}{
		{
			name: "default classes", notifyOn: []string{"failure", "stalled"},
			want: map[string]sent{"converted": {0, 0}, "failed": {1, 1}, "retrying": {0, 0}, "stalled": {1, 1}, "recovered": {1, 1}},
		},
		{
			name: "slack narrowed to failures", notifyOn: []string{"failure", "stalled"}, slackOn: []string{"failure"},
			want: map[string]sent{"converted": {0, 0}, "failed": {1, 1}, "stalled": {0, 1}, "recovered": {0, 1}},
		},
		{
			name: "narrowing cannot widen", notifyOn: []string{"failure"}, slackOn: []string{"success", "failure"},
			want: map[string]sent{"converted": {0, 0}, "failed": {1, 1}, "stalled": {0, 0}},
		},
		{
			name: "everything, spaces and case tolerated", notifyOn: []string{" Success", "FAILURE ", "stalled", ""},
			want: map[string]sent{"converted": {1, 1}, "failed": {1, 1}, "stalled": {1, 1}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			for kind, want := range tc.want {
				slack := newService(t, slackWebhookCheck, answer{status: 200, body: "ok"})
				hook := newService(t, nil)
				h, _ := newHandler(t, notify.Config{
					NotifyOn: tc.notifyOn, SlackWebhookURL: slack.URL + slackWebhookPath, SlackOn: tc.slackOn, WebhookURL: hook.URL,
				}, nil)
				var ev events.Event
				switch kind {
				case "converted":
					ev = convertedEvent(t, kind)
				case "failed":
					ev = failedEvent(t, kind, false)
				case "retrying":
					ev = failedEvent(t, kind, true)
				case "stalled":
					ev = stalledEvent(t, kind)
				case "recovered":
					ev = mustEvent(t, kind, events.TypeQueueRecover, "JOBS/convert", notify.QueueAlert{Stream: "JOBS", Consumer: "convert", IdleMinutes: 80})
				}
				if err := handle(t, h, ev); err != nil {
					t.Fatalf("%s: %v", kind, err)
				}
				if got := (sent{slack.count(), hook.count()}); got != want {
					t.Errorf("%s: slack/webhook got %+v, want %+v", kind, got, want)
				}
			}
		})
	}
}

func TestRedeliveredResultPostsOnce(t *testing.T) {
	js := startJetStream(t)
	ctx := context.Background()
	ledger, err := notify.NewKVLedger(ctx, js, 1)
	if err != nil {
		t.Fatal(err)
	}
	hook := newService(t, nil)
	discord := newService(t, discordCheck, answer{status: http.StatusNoContent})
	cfg := notify.Config{WebhookURL: hook.URL, DiscordWebhookURL: discord.URL + discordPath}
	replicaA, _ := newHandler(t, cfg, ledger)
	// A second replica with its own ledger handle on the same bucket, as
	// after a crash the redelivery may land anywhere.
	ledgerB, err := notify.NewKVLedger(ctx, js, 1)
	if err != nil {
		t.Fatal(err)
	}
	replicaB, _ := newHandler(t, cfg, ledgerB)

	ev := failedEvent(t, "ev-redelivered", false)
	for _, h := range []*notify.Handler{replicaA, replicaA, replicaB} {
		if err := handle(t, h, ev); err != nil {
			t.Fatalf("Handle: %v", err)
		}
	}
	if hook.count() != 1 || discord.count() != 1 {
		t.Errorf("webhook got %d, discord %d; want one each", hook.count(), discord.count())
	}
	for _, ch := range []string{"webhook", "discord"} {
		if ok, err := ledger.Delivered(ctx, "ev-redelivered", ch); !ok || err != nil {
			t.Errorf("ledger: %s delivered = %v, %v", ch, ok, err)
		}
	}
	if ok, _ := ledger.Delivered(ctx, "ev-redelivered", "email"); ok {
		t.Errorf("ledger claims a channel that never ran")
	}
	kv, err := js.KeyValue(ctx, events.NotifyLedgerBucket)
	if err != nil {
		t.Fatal(err)
	}
	st, err := kv.Status(ctx)
	if err != nil || st.TTL() != 7*24*time.Hour {
		t.Errorf("ledger bucket TTL = %v (%v), want 7 days", st.TTL(), err)
	}
}

func TestRedeliveryRetriesOnlyChannelsNotYetDelivered(t *testing.T) {
	js := startJetStream(t)
	ledger, err := notify.NewKVLedger(context.Background(), js, 1)
	if err != nil {
		t.Fatal(err)
	}
	hook := newService(t, nil)
	discord := newService(t, discordCheck, answer{status: http.StatusServiceUnavailable}, answer{status: http.StatusNoContent})
	h, _ := newHandler(t, notify.Config{WebhookURL: hook.URL, DiscordWebhookURL: discord.URL + discordPath}, ledger)

	ev := failedEvent(t, "ev-partial", false)
	err = handle(t, h, ev)
	if err == nil || failure.IsPermanent(err) {
		t.Fatalf("first delivery = %v, want retryable", err)
	}
	if !strings.Contains(err.Error(), "discord") || strings.Contains(err.Error(), "webhook:") {
		t.Errorf("error %q should name only the failed channel", err)
	}
	if err := handle(t, h, ev); err != nil {
		t.Fatalf("redelivery: %v", err)
	}
	if hook.count() != 1 || discord.count() != 2 {
		t.Errorf("webhook got %d (want 1), discord %d (want 2)", hook.count(), discord.count())
	}
}

func TestFailingChannelDoesNotBlockOthers(t *testing.T) {
	slack := newService(t, slackWebhookCheck, answer{status: 200, body: "ok"})
	// Discord never answers in time, the webhook refuses for good.
	discord := newService(t, discordCheck, answer{status: http.StatusNoContent, delay: 10 * time.Second})
	hook := newService(t, nil, answer{status: http.StatusGone, body: "gone"})
	h, _ := newHandler(t, notify.Config{
		SlackWebhookURL: slack.URL + slackWebhookPath, DiscordWebhookURL: discord.URL + discordPath, WebhookURL: hook.URL,
		HTTPTimeout: time.Second,
	}, nil)

	start := time.Now()
	err := handle(t, h, failedEvent(t, "ev-mixed", false))
	if err == nil || failure.IsPermanent(err) || !strings.Contains(err.Error(), "discord") {
		t.Fatalf("Handle = %v, want a retryable error naming discord", err)
	}
	if el := time.Since(start); el > 5*time.Second {
		t.Errorf("Handle took %s; the timeout is 1s", el)
	}
	if slack.count() != 1 || hook.count() != 1 {
		t.Errorf("slack got %d, webhook %d; want one each", slack.count(), hook.count())
	}
	if d := slack.requests()[0].at.Sub(start); d > 500*time.Millisecond {
		t.Errorf("slack was reached %s after the start, behind the hanging channel", d)
	}
	// On redelivery only Discord is tried again.
	_ = handle(t, h, failedEvent(t, "ev-mixed", false))
	if slack.count() != 1 || hook.count() != 1 || discord.count() != 2 {
		t.Errorf("redelivery: slack %d, webhook %d, discord %d", slack.count(), hook.count(), discord.count())
	}
}

func TestSecretsStayOutOfLogsAndErrors(t *testing.T) {
	// A port nothing listens on, so the HTTP error quotes the full URL.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := "http://" + l.Addr().String()
	l.Close()
	h, lb := newHandler(t, notify.Config{
		SlackWebhookURL:   dead + slackWebhookPath,
		DiscordWebhookURL: dead + discordPath,
		WebhookURL:        dead + "/hook?token=hunter2-query-token",
		WebhookSecret:     webhookSecret,
		SlackToken:        slackToken, SlackChannel: "C1", SlackAPIURL: dead + "/api/",
	}, nil)
	err = handle(t, h, failedEvent(t, "ev-dead", false))
	if err == nil || failure.IsPermanent(err) {
		t.Fatalf("Handle = %v, want retryable", err)
	}
	for _, secret := range []string{"XXXXXXXXXXXXXXXX", "aBcDeFgHiJkLmNoPqRsTuVwXyZ", "hunter2-query-token", slackToken, webhookSecret} {
		if strings.Contains(lb.String(), secret) || strings.Contains(err.Error(), secret) {
			t.Errorf("secret %q leaked:\nerr: %v\nlog:\n%s", secret, err, lb)
		}
	}
	if !strings.Contains(err.Error(), l.Addr().String()+"/[redacted]") {
		t.Errorf("error %q should still name the host", err)
	}
}

// pager is a channel a program adds in code, such as a paging service.
type pager struct {
	mu   sync.Mutex
	got  []notify.Message
	name string
}

func (p *pager) Name() string { return p.name }
func (p *pager) Send(_ context.Context, m notify.Message) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.got = append(p.got, m)
	return nil
}

func TestWithChannelAddsARoutedChannel(t *testing.T) {
	p := &pager{name: "pager"}
	h, _ := newHandler(t, notify.Config{NotifyOn: []string{"failure", "stalled"}}, nil, notify.WithChannel(p, "stalled"))
	for _, ev := range []events.Event{failedEvent(t, "f", false), stalledEvent(t, "s"), stalledEvent(t, "s")} {
		if err := handle(t, h, ev); err != nil {
			t.Fatal(err)
		}
	}
	if len(p.got) != 1 {
		t.Fatalf("pager got %d messages, want the one stall", len(p.got))
	}
	m := p.got[0]
	if m.Outcome != notify.OutcomeStalled || m.Title != "Conversion queue stalled" || m.Event.ID != "s" ||
		m.Summary != "3 job(s) in JOBS/convert have not moved for 75 minutes." {
		t.Errorf("message = %+v", m)
	}
	if _, err := notify.NewHandler(notify.Config{WebhookURL: "http://127.0.0.1:1/"}, nil, nil, nil, notify.WithChannel(&pager{name: "webhook"})); err == nil {
		t.Errorf("a channel name clash was accepted")
	}
}

func TestDuplicateResultNamesTheOriginal(t *testing.T) {
	p := &pager{name: "pager"}
	h, _ := newHandler(t, notify.Config{NotifyOn: []string{"success"}}, nil, notify.WithChannel(p))
	ev := mustEvent(t, "dup", events.TypeConverted, "b.vhdx", events.Converted{
		InputBucket: "uploads", InputKey: "b.vhdx", OutputBucket: "images", OutputKey: "b.vhdx.raw", OutputFormat: "raw",
		DuplicateOf: "images/a.vhdx.raw",
	})
	if err := handle(t, h, ev); err != nil {
		t.Fatal(err)
	}
	m := p.got[0]
	if !strings.HasSuffix(m.Summary, "Same content as images/a.vhdx.raw, copied instead of converted.") {
		t.Errorf("summary = %q", m.Summary)
	}
	if !slices.Contains(m.Facts, notify.Fact{Name: "Copied from", Value: "images/a.vhdx.raw"}) {
		t.Errorf("facts = %+v, want Copied from images/a.vhdx.raw", m.Facts)
	}
}
