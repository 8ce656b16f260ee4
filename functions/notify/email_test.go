package notify_test

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"errors"
	"io"
	"math/big"
	"mime"
	"mime/multipart"
	"net"
	"net/mail"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/notify"
	"github.com/imagepipe/imagepipe/test/stack"
)

// receivedMail is one message as the SMTP server saw it.
type receivedMail struct {
	from     string
	rcpts    []string
	data     []byte
	authUser string
	tls      bool
}

// smtpBackend is a real SMTP server's backend that keeps what it receives.
type smtpBackend struct {
	user, pass string // AUTH PLAIN credentials; empty means no AUTH offered
	rejectRcpt string // a recipient answered with 550

	mu   sync.Mutex
	mail []receivedMail
}

func (b *smtpBackend) NewSession(c *smtp.Conn) (smtp.Session, error) {
	_, isTLS := c.TLSConnectionState()
	s := &smtpSession{b: b, cur: receivedMail{tls: isTLS}}
	if b.user == "" {
		return plainSession{s}, nil
	}
	return s, nil
}

func (b *smtpBackend) received() []receivedMail {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]receivedMail(nil), b.mail...)
}

type smtpSession struct {
	b    *smtpBackend
	cur  receivedMail
	auth string
}

// plainSession hides the AUTH extension.
type plainSession struct{ s *smtpSession }

func (p plainSession) Reset()                                      { p.s.Reset() }
func (p plainSession) Logout() error                               { return nil }
func (p plainSession) Mail(from string, o *smtp.MailOptions) error { return p.s.Mail(from, o) }
func (p plainSession) Rcpt(to string, o *smtp.RcptOptions) error   { return p.s.Rcpt(to, o) }
func (p plainSession) Data(r io.Reader) error                      { return p.s.Data(r) }
func (s *smtpSession) AuthMechanisms() []string                    { return []string{sasl.Plain} }
func (s *smtpSession) Logout() error                               { return nil }
func (s *smtpSession) Reset()                                      { s.cur = receivedMail{tls: s.cur.tls} }
func (s *smtpSession) Mail(from string, _ *smtp.MailOptions) error {
	if s.b.user != "" && s.auth == "" {
		return smtp.ErrAuthRequired
	}
	s.cur.from = from
	return nil
}

func (s *smtpSession) Auth(string) (sasl.Server, error) {
	return sasl.NewPlainServer(func(_, user, pass string) error {
		if user != s.b.user || pass != s.b.pass {
			return smtp.ErrAuthFailed
		}
		s.auth = user
		return nil
	}), nil
}

func (s *smtpSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	if to == s.b.rejectRcpt {
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user here"}
	}
	s.cur.rcpts = append(s.cur.rcpts, to)
	return nil
}

func (s *smtpSession) Data(r io.Reader) error {
	data, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	s.cur.data = data
	s.cur.authUser = s.auth
	s.b.mu.Lock()
	s.b.mail = append(s.b.mail, s.cur)
	s.b.mu.Unlock()
	return nil
}

// startSMTP runs an SMTP server on a loopback port. With cert it offers
// STARTTLS, or with implicit it speaks TLS from the first byte.
func startSMTP(t *testing.T, b *smtpBackend, cert *tls.Certificate, implicit bool) string {
	t.Helper()
	s := smtp.NewServer(b)
	s.Domain = "mx.test"
	s.ReadTimeout, s.WriteTimeout = 10*time.Second, 10*time.Second
	var l net.Listener
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if cert != nil {
		cfg := &tls.Config{Certificates: []tls.Certificate{*cert}, MinVersion: tls.VersionTLS12}
		if implicit {
			l = tls.NewListener(l, cfg)
		} else {
			s.TLSConfig = cfg
		}
	}
	go func() { _ = s.Serve(l) }()
	t.Cleanup(func() { _ = s.Close() })
	return l.Addr().String()
}

// selfSigned makes a certificate for 127.0.0.1 and a pool that trusts it.
func selfSigned(t *testing.T) (*tls.Certificate, *x509.CertPool) {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "mx.test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:         true, BasicConstraintsValid: true,
	}
	c := stack.IssueCert(t, tmpl, nil)
	pool := x509.NewCertPool()
	pool.AddCert(c.Leaf)
	return c.TLS(), pool
}

// parsedMail is a received message read back the way a mail client would.
type parsedMail struct {
	header      mail.Header
	subject     string
	contentType string
	plain, html string
}

func parseMail(t *testing.T, data []byte) parsedMail {
	t.Helper()
	m, err := mail.ReadMessage(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("read message: %v", err)
	}
	dec := new(mime.WordDecoder)
	subject, err := dec.DecodeHeader(m.Header.Get("Subject"))
	if err != nil {
		t.Fatalf("subject: %v", err)
	}
	p := parsedMail{header: m.Header, subject: subject}
	mt, params, err := mime.ParseMediaType(m.Header.Get("Content-Type"))
	if err != nil {
		t.Fatalf("content type: %v", err)
	}
	p.contentType = mt
	if mt != "multipart/alternative" {
		return p
	}
	mr := multipart.NewReader(m.Body, params["boundary"])
	for {
		part, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("part: %v", err)
		}
		// NextPart undoes quoted-printable itself; base64 is left to us.
		var r io.Reader = part
		if strings.EqualFold(part.Header.Get("Content-Transfer-Encoding"), "base64") {
			r = base64.NewDecoder(base64.StdEncoding, part)
		}
		body, err := io.ReadAll(r)
		if err != nil {
			t.Fatalf("part body: %v", err)
		}
		pmt, pparams, _ := mime.ParseMediaType(part.Header.Get("Content-Type"))
		if cs := pparams["charset"]; !strings.EqualFold(cs, "utf-8") {
			t.Errorf("%s part charset %q", pmt, cs)
		}
		// Lines travel as CRLF; compare them as a mail client shows them.
		text := strings.ReplaceAll(string(body), "\r\n", "\n")
		switch pmt {
		case "text/plain":
			p.plain = text
		case "text/html":
			p.html = text
		default:
			t.Errorf("unexpected part %s", pmt)
		}
	}
	return p
}

func emailConfig(addr string) notify.Config {
	return notify.Config{
		SMTPAddr: addr,
		SMTPFrom: "imagepipe <imagepipe@example.test>",
		SMTPTo:   []string{" ops@example.test "},
	}
}

func TestEmailThroughLocalRelayWithoutAuth(t *testing.T) {
	b := &smtpBackend{}
	addr := startSMTP(t, b, nil, false)
	cfg := emailConfig(addr)
	cfg.SMTPTLS = "off"
	h, _ := newHandler(t, cfg, nil)

	if err := handle(t, h, failedEvent(t, "ev-mail-1", false)); err != nil {
		t.Fatalf("Handle: %v", err)
	}
	got := b.received()
	if len(got) != 1 {
		t.Fatalf("server received %d messages, want 1", len(got))
	}
	m := got[0]
	if m.from != "imagepipe@example.test" || strings.Join(m.rcpts, ",") != "ops@example.test" {
		t.Errorf("envelope from %q to %v", m.from, m.rcpts)
	}
	if m.tls || m.authUser != "" {
		t.Errorf("tls=%v auth=%q on a plain relay", m.tls, m.authUser)
	}
	p := parseMail(t, m.data)
	if p.subject != "[imagepipe] Failed to convert disks/evil.qcow2" {
		t.Errorf("Subject = %q", p.subject)
	}
	if from, _ := p.header.AddressList("From"); len(from) != 1 || from[0].Address != "imagepipe@example.test" || from[0].Name != "imagepipe" {
		t.Errorf("From = %v", from)
	}
	if to, _ := p.header.AddressList("To"); len(to) != 1 || to[0].Address != "ops@example.test" {
		t.Errorf("To = %v", to)
	}
	if id := p.header.Get("Message-Id"); id != "<ev-mail-1@imagepipe>" {
		t.Errorf("Message-Id = %q", id)
	}
	if _, err := p.header.Date(); err != nil {
		t.Errorf("Date: %v", err)
	}
	if p.contentType != "multipart/alternative" {
		t.Fatalf("Content-Type = %q", p.contentType)
	}
	bodyHas(t, "plain", p.plain,
		"uploads/disks/evil.qcow2 failed in inspect: the image names a backing file (/etc/shadow)",
		"Phase:     inspect",
		"Error:\nthe image names a backing file (/etc/shadow)",
		"Suggestion:\nFlatten the image with qemu-img convert before uploading it.",
		"event ev-mail-1",
	)
	bodyHas(t, "html", p.html,
		"<h2 style=\"margin:0 0 8px 0\">Failed to convert disks/evil.qcow2</h2>",
		"<th align=\"left\" valign=\"top\">Phase</th><td>inspect</td>",
		"border-left:4px solid #E01E5A",
		"Flatten the image with qemu-img convert before uploading it.",
	)
}

// bodyHas checks that the mail's body of one kind (plain, html) holds
// every one of wants.
func bodyHas(t *testing.T, kind, body string, wants ...string) {
	t.Helper()
	for _, want := range wants {
		if !strings.Contains(body, want) {
			t.Errorf("%s body lacks %q:\n%s", kind, want, body)
		}
	}
}

func TestEmailEscapesObjectKeysInHTML(t *testing.T) {
	b := &smtpBackend{}
	cfg := emailConfig(startSMTP(t, b, nil, false))
	cfg.SMTPTLS = "off"
	h, _ := newHandler(t, cfg, nil)
	ev := mustEvent(t, "ev-xss", events.TypeFailed, "x", events.Failed{
		InputBucket: "uploads", InputKey: "<script>alert(1)</script>.vhdx\r\nBcc: victim@example.test",
		Phase: events.PhaseIntake, Message: "not a disk image",
	})
	if err := handle(t, h, ev); err != nil {
		t.Fatal(err)
	}
	m := b.received()[0]
	p := parseMail(t, m.data)
	if strings.Contains(p.html, "<script>") || !strings.Contains(p.html, "&lt;script&gt;") {
		t.Errorf("html body does not escape the key:\n%s", p.html)
	}
	if p.header.Get("Bcc") != "" || len(m.rcpts) != 1 || len(b.received()) != 1 {
		t.Errorf("a key injected a header: Bcc=%q rcpts=%v", p.header.Get("Bcc"), m.rcpts)
	}
}

func TestEmailStartTLSWithAuth(t *testing.T) {
	cert, pool := selfSigned(t)
	b := &smtpBackend{user: "imagepipe", pass: "s3cr3t-smtp-pass"}
	cfg := emailConfig(startSMTP(t, b, cert, false))
	cfg.SMTPUsername, cfg.SMTPPassword = b.user, b.pass
	h, _ := newHandler(t, cfg, nil, notify.WithSMTPTLSConfig(&tls.Config{RootCAs: pool}))

	if err := handle(t, h, convertedEvent(t, "ev-mail-tls")); err != nil {
		t.Fatalf("Handle: %v", err)
	}
	got := b.received()
	if len(got) != 1 {
		t.Fatalf("received %d", len(got))
	}
	if !got[0].tls || got[0].authUser != "imagepipe" {
		t.Errorf("tls=%v auth=%q, want STARTTLS then AUTH as imagepipe", got[0].tls, got[0].authUser)
	}
	p := parseMail(t, got[0].data)
	if p.subject != "[imagepipe] Converted disks/win11.vhdx" || !strings.Contains(p.plain, "Location:      images/disks/win11.vhdx.raw") ||
		!strings.Contains(p.html, "#2EB67D") {
		t.Errorf("subject %q\nplain:\n%s\nhtml:\n%s", p.subject, p.plain, p.html)
	}
}

func TestEmailImplicitTLS(t *testing.T) {
	cert, pool := selfSigned(t)
	b := &smtpBackend{user: "imagepipe", pass: "pw-implicit"}
	cfg := emailConfig(startSMTP(t, b, cert, true))
	cfg.SMTPTLS = "tls"
	cfg.SMTPUsername, cfg.SMTPPassword = b.user, b.pass
	h, _ := newHandler(t, cfg, nil, notify.WithSMTPTLSConfig(&tls.Config{RootCAs: pool}))
	if err := handle(t, h, stalledEvent(t, "ev-mail-465")); err != nil {
		t.Fatalf("Handle: %v", err)
	}
	got := b.received()
	if len(got) != 1 || !got[0].tls || got[0].authUser != "imagepipe" {
		t.Fatalf("received %+v", got)
	}
	if p := parseMail(t, got[0].data); p.subject != "[imagepipe] Conversion queue stalled" {
		t.Errorf("Subject = %q", p.subject)
	}
}

func TestEmailUntrustedCertificateIsNotDelivered(t *testing.T) {
	cert, _ := selfSigned(t)
	b := &smtpBackend{user: "imagepipe", pass: "never-sent"}
	cfg := emailConfig(startSMTP(t, b, cert, false))
	cfg.SMTPUsername, cfg.SMTPPassword = b.user, b.pass
	h, lb := newHandler(t, cfg, nil) // system roots only
	err := handle(t, h, failedEvent(t, "ev-untrusted", false))
	if err == nil {
		t.Fatal("Handle succeeded against an untrusted certificate")
	}
	if len(b.received()) != 0 {
		t.Errorf("message delivered over an untrusted connection")
	}
	if strings.Contains(lb.String(), "never-sent") || strings.Contains(err.Error(), "never-sent") {
		t.Errorf("password leaked: %v\n%s", err, lb)
	}
}

func TestEmailWrongPasswordIsRefusedForGood(t *testing.T) {
	cert, pool := selfSigned(t)
	b := &smtpBackend{user: "imagepipe", pass: "right"}
	cfg := emailConfig(startSMTP(t, b, cert, false))
	cfg.SMTPUsername, cfg.SMTPPassword = "imagepipe", "wrong-password-123"
	h, lb := newHandler(t, cfg, nil, notify.WithSMTPTLSConfig(&tls.Config{RootCAs: pool}))
	if err := handle(t, h, failedEvent(t, "ev-535", false)); err != nil {
		t.Fatalf("Handle = %v, want nil: a 535 will not change on retry", err)
	}
	refusals := lb.lines(t, "channel refused the notification; not retrying")
	if len(refusals) != 1 || refusals[0]["status"] != float64(535) {
		t.Errorf("refusals = %v", refusals)
	}
	if strings.Contains(lb.String(), "wrong-password-123") {
		t.Errorf("password in log:\n%s", lb)
	}
}

func TestEmailRejectedRecipientIsNotRetriedAndTheOthersGetTheMail(t *testing.T) {
	b := &smtpBackend{rejectRcpt: "ops@example.test"}
	cfg := emailConfig(startSMTP(t, b, nil, false))
	cfg.SMTPTo = []string{"ops@example.test", "storage-team@example.test", "oncall@example.test"}
	cfg.SMTPTLS = "off"
	h, lb := newHandler(t, cfg, nil)
	for range 2 {
		if err := handle(t, h, failedEvent(t, "ev-550", false)); err != nil {
			t.Fatalf("Handle = %v: a 550 will not change on retry", err)
		}
	}
	refusals := lb.lines(t, "channel refused the notification; not retrying")
	if len(refusals) != 1 || refusals[0]["status"] != float64(550) || refusals[0]["channel"] != "email:ops@example.test" {
		t.Errorf("refusals = %v", refusals)
	}
	// Each of the others once, to itself alone, though the event came twice.
	var got []string
	for _, m := range b.received() {
		to, _ := parseMail(t, m.data).header.AddressList("To")
		if len(to) != 1 || len(m.rcpts) != 1 || to[0].Address != m.rcpts[0] {
			t.Errorf("a message to %v with To %v, want one recipient named in both", m.rcpts, to)
		}
		got = append(got, m.rcpts...)
	}
	slices.Sort(got)
	if want := []string{"oncall@example.test", "storage-team@example.test"}; !slices.Equal(got, want) {
		t.Errorf("delivered to %v, want %v once each", got, want)
	}
}
