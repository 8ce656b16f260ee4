package notify

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"html/template"
	"net/textproto"
	"strings"
	"time"

	"github.com/wneessen/go-mail"
)

// email sends a multipart/alternative message over SMTP to one recipient.
type email struct {
	name string
	host string
	opts []mail.Option
	from string
	to   string
	r    *redactor
}

// newEmails returns a channel per recipient. An SMTP transaction with
// several recipients fails whole when the relay refuses one of them, so one
// mistyped address would cost everyone the message; on their own channels
// each is delivered, retried and recorded apart.
func newEmails(cfg Config, tlsConfig *tls.Config, r *redactor) ([]*email, error) {
	host, port, implicitTLS, plain, err := smtpEndpoint(cfg.SMTPAddr, cfg.SMTPTLS)
	if err != nil {
		return nil, err
	}
	if cfg.SMTPFrom == "" {
		return nil, errors.New("IMAGEPIPE_SMTP_FROM is required with IMAGEPIPE_SMTP_ADDR")
	}
	var to []string
	for _, t := range cfg.SMTPTo {
		if t = strings.TrimSpace(t); t != "" {
			to = append(to, t)
		}
	}
	if len(to) == 0 {
		return nil, errors.New("IMAGEPIPE_SMTP_TO is required with IMAGEPIPE_SMTP_ADDR")
	}
	if tlsConfig == nil {
		tlsConfig = &tls.Config{}
	}
	tlsConfig = tlsConfig.Clone()
	if tlsConfig.ServerName == "" {
		tlsConfig.ServerName = host
	}
	if tlsConfig.MinVersion == 0 {
		tlsConfig.MinVersion = tls.VersionTLS12
	}
	opts := []mail.Option{
		mail.WithPort(port),
		mail.WithTimeout(cfg.HTTPTimeout),
		mail.WithTLSConfig(tlsConfig),
	}
	switch {
	case plain:
		opts = append(opts, mail.WithTLSPolicy(mail.NoTLS))
	case implicitTLS:
		opts = append(opts, mail.WithSSL())
	default:
		// Mandatory, not opportunistic: a relay that stops offering
		// STARTTLS must not get the password in clear text.
		opts = append(opts, mail.WithTLSPolicy(mail.TLSMandatory))
	}
	if cfg.SMTPUsername != "" {
		// Auto-discovery picks the strongest mechanism the server offers and
		// refuses PLAIN and LOGIN on an unencrypted connection.
		opts = append(opts,
			mail.WithSMTPAuth(mail.SMTPAuthAutoDiscover),
			mail.WithUsername(cfg.SMTPUsername),
			mail.WithPassword(cfg.SMTPPassword))
	}
	var out []*email
	for _, addr := range to {
		name := "email"
		if len(to) > 1 {
			name = "email:" + addr
		}
		out = append(out, &email{name: name, host: host, opts: opts, from: cfg.SMTPFrom, to: addr, r: r})
	}
	return out, nil
}

func (e *email) Name() string { return e.name }

func (e *email) Send(ctx context.Context, m Message) error {
	msg, err := e.compose(m)
	if err != nil {
		return &DeliveryError{Channel: e.Name(), Permanent: true, reason: "compose: " + e.r.redact(err.Error())}
	}
	// A client per message: notifications are rare, and a fresh connection
	// never trips over a relay that dropped an idle one.
	client, err := mail.NewClient(e.host, e.opts...)
	if err != nil {
		return &DeliveryError{Channel: e.Name(), Permanent: true, reason: "configure: " + e.r.redact(err.Error())}
	}
	if err := client.DialAndSendWithContext(ctx, msg); err != nil {
		return smtpFailure(e.Name(), err, e.r)
	}
	return nil
}

func (e *email) compose(m Message) (*mail.Msg, error) {
	msg := mail.NewMsg()
	if err := msg.From(e.from); err != nil {
		return nil, fmt.Errorf("from: %w", err)
	}
	if err := msg.To(e.to); err != nil {
		return nil, fmt.Errorf("to: %w", err)
	}
	msg.Subject(emailSubject(m))
	// The Message-ID comes from the event, so if a result is ever mailed
	// twice, mail clients thread or drop the copy.
	msg.SetMessageIDWithValue(m.EventID + "@imagepipe")
	msg.SetDate()
	msg.SetUserAgent(userAgent)
	msg.SetBulk()
	html, err := emailHTML(m)
	if err != nil {
		return nil, err
	}
	msg.SetBodyString(mail.TypeTextPlain, emailText(m))
	msg.AddAlternativeString(mail.TypeTextHTML, html)
	return msg, nil
}

// smtpFailure classifies an SMTP error by its reply code: 4xx is the
// server's "try again later", 5xx its "never" (bad recipient, bad password).
// No code means no answer, which a later attempt may get.
func smtpFailure(channel string, err error, r *redactor) error {
	var (
		se   *mail.SendError
		perr *textproto.Error
	)
	code := 0
	switch {
	case errors.As(err, &perr):
		code = perr.Code
	case errors.As(err, &se):
		code = se.ErrorCode()
	}
	reason := r.redact(err.Error())
	if code == 0 {
		if errors.Is(err, context.DeadlineExceeded) {
			return &DeliveryError{Channel: channel, reason: "timed out: " + reason}
		}
		return &DeliveryError{Channel: channel, reason: "request failed: " + reason}
	}
	return &DeliveryError{Channel: channel, Status: code, Permanent: code >= 500, reason: "refused: " + reason}
}

func emailSubject(m Message) string {
	return "[imagepipe] " + strings.Map(func(r rune) rune {
		// A header must stay on one line whatever an object key holds.
		if r == '\r' || r == '\n' {
			return ' '
		}
		return r
	}, m.Title)
}

func emailText(m Message) string {
	var b strings.Builder
	b.WriteString(m.Summary)
	b.WriteString("\n\n")
	width := 0
	for _, f := range m.Facts {
		width = max(width, len(f.Name))
	}
	for _, f := range m.Facts {
		fmt.Fprintf(&b, "%-*s  %s\n", width+1, f.Name+":", f.Value)
	}
	for _, n := range m.Notes {
		fmt.Fprintf(&b, "\n%s:\n%s\n", n.Name, n.Value)
	}
	fmt.Fprintf(&b, "\n-- \nimagepipe, event %s", m.EventID)
	if !m.Time.IsZero() {
		fmt.Fprintf(&b, " at %s", m.Time.UTC().Format(time.RFC3339))
	}
	b.WriteString("\n")
	return b.String()
}

var emailTemplate = template.Must(template.New("email").Parse(`<!DOCTYPE html>
<html><body style="font-family:sans-serif;font-size:14px;color:#1d1c1d">
<div style="border-left:4px solid {{.Color}};padding-left:12px">
<h2 style="margin:0 0 8px 0">{{.M.Title}}</h2>
<p>{{.M.Summary}}</p>
<table cellpadding="4" style="border-collapse:collapse">
{{- range .M.Facts}}
<tr><th align="left" valign="top">{{.Name}}</th><td>{{.Value}}</td></tr>
{{- end}}
</table>
{{- range .M.Notes}}
<h3 style="margin:12px 0 4px 0">{{.Name}}</h3>
<p style="white-space:pre-wrap">{{.Value}}</p>
{{- end}}
</div>
<p style="color:#616061;font-size:12px">imagepipe, event {{.M.EventID}}</p>
</body></html>
`))

func emailHTML(m Message) (string, error) {
	color := map[Outcome]string{
		OutcomeConverted: "#2EB67D", OutcomeRecovered: "#2EB67D",
		OutcomeFailed: "#E01E5A", OutcomeStalled: "#ECB22E",
	}[m.Outcome]
	var b bytes.Buffer
	if err := emailTemplate.Execute(&b, struct {
		M     Message
		Color string
	}{m, color}); err != nil {
		return "", fmt.Errorf("render html: %w", err)
	}
	return b.String(), nil
}
