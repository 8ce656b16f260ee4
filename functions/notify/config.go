package notify

import (
	"errors"
	"fmt"
	"net"
	"net/mail"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/config"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/secrets"
)

// Routing classes, the values of IMAGEPIPE_NOTIFY_ON and the per-channel
// *_ON variables.
const (
	OnSuccess = "success"
	OnFailure = "failure"
	OnStalled = "stalled"
)

// SMTP transport security, the values of IMAGEPIPE_SMTP_TLS.
const (
	SMTPTLSAuto     = "auto"     // implicit TLS on port 465, STARTTLS on any other port
	SMTPTLSStartTLS = "starttls" // STARTTLS whatever the port
	SMTPTLSImplicit = "tls"      // implicit TLS whatever the port
	SMTPTLSOff      = "off"      // plain text; for a relay on the same host only
)

// DefaultSlackAPIURL is Slack's Web API. GovSlack and tests point elsewhere.
const DefaultSlackAPIURL = "https://slack.com/api/"

// Config is the notify function's settings, parsed from the environment by
// caarlos0/env in main. A channel is enabled by setting its address; an empty
// *_ON list means the channel takes every class NotifyOn allows, a non-empty
// one narrows it.
type Config struct {
	NotifyOn []string `env:"IMAGEPIPE_NOTIFY_ON" envDefault:"failure,stalled" envSeparator:"," doc:"which results reach people: any of success, failure, stalled" takes:"any of success, failure, stalled, comma-separated"`

	SlackWebhookURL string   `env:"IMAGEPIPE_SLACK_WEBHOOK_URL" secret:"true" doc:"Slack incoming webhook"`
	SlackToken      string   `env:"IMAGEPIPE_SLACK_TOKEN" secret:"true" doc:"Slack bot token (chat.postMessage); set with IMAGEPIPE_SLACK_CHANNEL"`
	SlackChannel    string   `env:"IMAGEPIPE_SLACK_CHANNEL" doc:"Slack channel the bot token posts to"`
	SlackAPIURL     string   `env:"IMAGEPIPE_SLACK_API_URL" envDefault:"https://slack.com/api/" doc:"Slack Web API base" takes:"an http:// or https:// URL"`
	SlackOn         []string `env:"IMAGEPIPE_SLACK_ON" envSeparator:"," doc:"narrow IMAGEPIPE_NOTIFY_ON for Slack (default: all of it)" takes:"any of success, failure, stalled, comma-separated"`

	DiscordWebhookURL string   `env:"IMAGEPIPE_DISCORD_WEBHOOK_URL" secret:"true" doc:"Discord webhook"`
	DiscordOn         []string `env:"IMAGEPIPE_DISCORD_ON" envSeparator:"," doc:"narrow IMAGEPIPE_NOTIFY_ON for Discord (default: all of it)" takes:"any of success, failure, stalled, comma-separated"`

	WebhookURL    string   `env:"IMAGEPIPE_WEBHOOK_URL" secret:"true" doc:"generic webhook receiving the CloudEvent"`
	WebhookSecret string   `env:"IMAGEPIPE_WEBHOOK_SECRET" secret:"true" doc:"signs the generic webhook's body with HMAC-SHA256 when set"`
	WebhookOn     []string `env:"IMAGEPIPE_WEBHOOK_ON" envSeparator:"," doc:"narrow IMAGEPIPE_NOTIFY_ON for the webhook (default: all of it)" takes:"any of success, failure, stalled, comma-separated"`

	SMTPAddr     string   `env:"IMAGEPIPE_SMTP_ADDR" doc:"SMTP server host[:port] for email (port 587 when none is given)" takes:"HOST or HOST:PORT"`
	SMTPUsername string   `env:"IMAGEPIPE_SMTP_USERNAME" doc:"SMTP user"`
	SMTPPassword string   `env:"IMAGEPIPE_SMTP_PASSWORD" secret:"true" doc:"SMTP password"`
	SMTPFrom     string   `env:"IMAGEPIPE_SMTP_FROM" doc:"sender address; required with IMAGEPIPE_SMTP_ADDR" takes:"an email address"`
	SMTPTo       []string `env:"IMAGEPIPE_SMTP_TO" envSeparator:"," doc:"recipients, comma-separated, each sent its own message (and its own channel, email:ADDRESS, in logs and metrics); required with IMAGEPIPE_SMTP_ADDR" takes:"email addresses, comma-separated"`
	SMTPTLS      string   `env:"IMAGEPIPE_SMTP_TLS" envDefault:"auto" doc:"auto (implicit TLS on 465, required STARTTLS otherwise), starttls, tls, or off for a local relay" takes:"auto, starttls, tls or off"`
	EmailOn      []string `env:"IMAGEPIPE_EMAIL_ON" envSeparator:"," doc:"narrow IMAGEPIPE_NOTIFY_ON for email (default: all of it)" takes:"any of success, failure, stalled, comma-separated"`

	HTTPTimeout time.Duration `env:"IMAGEPIPE_NOTIFY_TIMEOUT" envDefault:"10s" doc:"timeout of each notification call"`
	StallAfter  time.Duration `env:"IMAGEPIPE_STALL_AFTER" envDefault:"60m" doc:"the watchdog alerts when queued jobs have not moved for this long"`
	StallCheck  time.Duration `env:"IMAGEPIPE_STALL_CHECK_EVERY" envDefault:"1m" doc:"how often the watchdog looks at the queue and counts uploads with no job"`
}

// Binding is how the runtime feeds notify everything the RESULTS stream
// holds: results and queue alerts. A channel that is down for long keeps
// its messages in the stream: about a day and a half of retries before
// giving up.
func (c Config) Binding() natsrt.Binding {
	return natsrt.Binding{
		Stream: events.StreamResults, Durable: events.ConsumerNotify,
		Concurrency: 4, AckWait: time.Minute,
		MaxAttempts: 200,
		Backoff:     []time.Duration{5 * time.Second, 30 * time.Second, 2 * time.Minute, 10 * time.Minute},
	}
}

// CheckSecrets refuses the placeholder webhook secret and SMTP password
// the example environment files show, so that notify never signs with,
// or logs in with, a secret everyone knows.
func (c Config) CheckSecrets() error {
	if err := secrets.Check("IMAGEPIPE_WEBHOOK_SECRET", c.WebhookSecret); err != nil {
		return err
	}
	return secrets.Check("IMAGEPIPE_SMTP_PASSWORD", c.SMTPPassword)
}

// Validate finds, before anything connects, every setting NewHandler
// would refuse, and a few it would only trip on later.
func (c Config) Validate() error {
	var problems []error
	for _, l := range []struct {
		name string
		list []string
	}{{"IMAGEPIPE_NOTIFY_ON", c.NotifyOn}, {"IMAGEPIPE_SLACK_ON", c.SlackOn}, {"IMAGEPIPE_DISCORD_ON", c.DiscordOn},
		{"IMAGEPIPE_WEBHOOK_ON", c.WebhookOn}, {"IMAGEPIPE_EMAIL_ON", c.EmailOn}} {
		if _, err := parseClasses(l.name, l.list); err != nil {
			problems = append(problems, config.Invalid(l.name, strings.Join(l.list, ","), "want any of success, failure, stalled, comma-separated"))
		}
	}
	for _, u := range []struct{ name, url string }{
		{"IMAGEPIPE_SLACK_WEBHOOK_URL", c.SlackWebhookURL}, {"IMAGEPIPE_DISCORD_WEBHOOK_URL", c.DiscordWebhookURL},
		{"IMAGEPIPE_WEBHOOK_URL", c.WebhookURL},
	} {
		if u.url != "" && checkURL(u.name, u.url) != nil {
			problems = append(problems, config.InvalidSecret(u.name, "want an http:// or https:// URL"))
		}
	}
	if c.SlackAPIURL != "" && checkURL("IMAGEPIPE_SLACK_API_URL", c.SlackAPIURL) != nil {
		problems = append(problems, config.Invalid("IMAGEPIPE_SLACK_API_URL", c.SlackAPIURL, "want an http:// or https:// URL"))
	}
	switch {
	case c.SlackToken != "" && c.SlackChannel == "":
		problems = append(problems, errors.New("IMAGEPIPE_SLACK_TOKEN is set without IMAGEPIPE_SLACK_CHANNEL: set both, or neither"))
	case c.SlackToken == "" && c.SlackChannel != "":
		problems = append(problems, config.Invalid("IMAGEPIPE_SLACK_CHANNEL", c.SlackChannel, "set without IMAGEPIPE_SLACK_TOKEN: set both, or neither"))
	}
	problems = append(problems, c.validateSMTP()...)
	problems = append(problems,
		config.Positive("IMAGEPIPE_NOTIFY_TIMEOUT", c.HTTPTimeout),
		config.Positive("IMAGEPIPE_STALL_AFTER", c.StallAfter),
		config.Positive("IMAGEPIPE_STALL_CHECK_EVERY", c.StallCheck),
		c.CheckSecrets())
	return errors.Join(problems...)
}

func (c Config) validateSMTP() []error {
	tlsMode := strings.ToLower(strings.TrimSpace(c.SMTPTLS))
	if err := config.OneOf("IMAGEPIPE_SMTP_TLS", tlsMode, "", SMTPTLSAuto, SMTPTLSStartTLS, SMTPTLSImplicit, SMTPTLSOff); err != nil {
		return []error{config.Invalid("IMAGEPIPE_SMTP_TLS", c.SMTPTLS, "want auto, starttls, tls or off")}
	}
	if c.SMTPAddr == "" {
		return nil
	}
	var problems []error
	if _, _, _, _, err := smtpEndpoint(c.SMTPAddr, c.SMTPTLS); err != nil {
		problems = append(problems, config.Invalid("IMAGEPIPE_SMTP_ADDR", c.SMTPAddr, "want HOST or HOST:PORT, such as smtp.example.com:587"))
	}
	if c.SMTPFrom == "" {
		problems = append(problems, errors.New("IMAGEPIPE_SMTP_FROM is required with IMAGEPIPE_SMTP_ADDR"))
	} else if _, err := mail.ParseAddress(c.SMTPFrom); err != nil {
		problems = append(problems, config.Invalid("IMAGEPIPE_SMTP_FROM", c.SMTPFrom, "want an email address, such as imagepipe@example.com"))
	}
	if strings.TrimSpace(strings.Join(c.SMTPTo, "")) == "" {
		problems = append(problems, errors.New("IMAGEPIPE_SMTP_TO is required with IMAGEPIPE_SMTP_ADDR"))
	}
	for _, to := range c.SMTPTo {
		if to = strings.TrimSpace(to); to == "" {
			continue
		}
		if _, err := mail.ParseAddress(to); err != nil {
			problems = append(problems, config.Invalid("IMAGEPIPE_SMTP_TO", strings.Join(c.SMTPTo, ","), "want email addresses, comma-separated"))
			break
		}
	}
	return problems
}

// routes is the set of routing classes one channel takes.
type routes map[string]bool

// parseClasses normalises a list from the environment: trimmed, lower case,
// empty items dropped (so "failure, stalled," is fine), unknown ones refused
// because a typo would otherwise silence a channel without a word.
func parseClasses(name string, list []string) ([]string, error) {
	var out []string
	for _, s := range list {
		s = strings.ToLower(strings.TrimSpace(s))
		switch s {
		case "":
			continue
		case OnSuccess, OnFailure, OnStalled:
			if !slices.Contains(out, s) {
				out = append(out, s)
			}
		default:
			return nil, fmt.Errorf("%s: unknown value %q (want %s, %s or %s)", name, s, OnSuccess, OnFailure, OnStalled)
		}
	}
	return out, nil
}

// narrow intersects the global classes with a channel's own list and names
// the classes the channel asked for that the global list does not enable,
// which is almost always a configuration mistake worth a warning.
func narrow(global []string, name string, own []string) (routes, []string, error) {
	ownClasses, err := parseClasses(name, own)
	if err != nil {
		return nil, nil, err
	}
	r := routes{}
	if len(ownClasses) == 0 {
		for _, c := range global {
			r[c] = true
		}
		return r, nil, nil
	}
	var ignored []string
	for _, c := range ownClasses {
		if slices.Contains(global, c) {
			r[c] = true
		} else {
			ignored = append(ignored, c)
		}
	}
	return r, ignored, nil
}

// smtpEndpoint splits IMAGEPIPE_SMTP_ADDR and decides how the connection is
// secured. Without a port the submission port 587 is assumed.
func smtpEndpoint(addr, mode string) (host string, port int, implicitTLS, plain bool, err error) {
	host, p, splitErr := net.SplitHostPort(addr)
	if splitErr != nil {
		host, p = addr, "587"
	}
	if host == "" {
		return "", 0, false, false, errors.New("IMAGEPIPE_SMTP_ADDR: no host")
	}
	port, err = strconv.Atoi(p)
	if err != nil || port < 1 || port > 65535 {
		return "", 0, false, false, fmt.Errorf("IMAGEPIPE_SMTP_ADDR: bad port %q", p)
	}
	switch strings.ToLower(strings.TrimSpace(mode)) {
	case "", SMTPTLSAuto:
		implicitTLS = port == 465
	case SMTPTLSStartTLS:
	case SMTPTLSImplicit:
		implicitTLS = true
	case SMTPTLSOff:
		plain = true
	default:
		return "", 0, false, false, fmt.Errorf("IMAGEPIPE_SMTP_TLS: unknown value %q (want auto, starttls, tls or off)", mode)
	}
	return host, port, implicitTLS, plain, nil
}

// checkURL refuses a URL that could never work, without echoing it: webhook
// URLs carry their credential in the path.
func checkURL(name, raw string) error {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("%s: not an http(s) URL", name)
	}
	return nil
}
