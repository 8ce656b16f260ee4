package notify

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

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
	NotifyOn []string `env:"IMAGEPIPE_NOTIFY_ON" envDefault:"failure,stalled" envSeparator:","`

	SlackWebhookURL string   `env:"IMAGEPIPE_SLACK_WEBHOOK_URL"`
	SlackToken      string   `env:"IMAGEPIPE_SLACK_TOKEN"`
	SlackChannel    string   `env:"IMAGEPIPE_SLACK_CHANNEL"`
	SlackAPIURL     string   `env:"IMAGEPIPE_SLACK_API_URL" envDefault:"https://slack.com/api/"`
	SlackOn         []string `env:"IMAGEPIPE_SLACK_ON" envSeparator:","`

	DiscordWebhookURL string   `env:"IMAGEPIPE_DISCORD_WEBHOOK_URL"`
	DiscordOn         []string `env:"IMAGEPIPE_DISCORD_ON" envSeparator:","`

	WebhookURL    string   `env:"IMAGEPIPE_WEBHOOK_URL"`
	WebhookSecret string   `env:"IMAGEPIPE_WEBHOOK_SECRET"`
	WebhookOn     []string `env:"IMAGEPIPE_WEBHOOK_ON" envSeparator:","`

	SMTPAddr     string   `env:"IMAGEPIPE_SMTP_ADDR"`
	SMTPUsername string   `env:"IMAGEPIPE_SMTP_USERNAME"`
	SMTPPassword string   `env:"IMAGEPIPE_SMTP_PASSWORD"`
	SMTPFrom     string   `env:"IMAGEPIPE_SMTP_FROM"`
	SMTPTo       []string `env:"IMAGEPIPE_SMTP_TO" envSeparator:","`
	SMTPTLS      string   `env:"IMAGEPIPE_SMTP_TLS" envDefault:"auto"`
	EmailOn      []string `env:"IMAGEPIPE_EMAIL_ON" envSeparator:","`

	HTTPTimeout time.Duration `env:"IMAGEPIPE_NOTIFY_TIMEOUT" envDefault:"10s"`
	StallAfter  time.Duration `env:"IMAGEPIPE_STALL_AFTER" envDefault:"60m"`
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
