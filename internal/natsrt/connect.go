package natsrt

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/imagepipe/imagepipe/internal/config"
	"github.com/imagepipe/imagepipe/internal/secrets"
)

// Config is how to reach NATS.
type Config struct {
	// URL unset means the nats CLI's selected context, if any (see
	// effective), else DefaultURL.
	URL   string `env:"IMAGEPIPE_NATS_URL" secret:"url" doc:"NATS server(s), comma-separated; a user and password in a URL are never shown. Unset: the url, sign-in and TLS files of the nats CLI context selected (NATS_CONTEXT, or nats context select), else nats://127.0.0.1:4222" takes:"URLs such as nats://HOST:4222 or tls://HOST:4222, comma-separated"`
	Creds string `env:"IMAGEPIPE_NATS_CREDS" doc:"a NATS credentials file (JWT and nkey seed), as nsc writes it" takes:"a file's path"`
	// User and Password (read from the file IMAGEPIPE_NATS_PASSWORD_FILE
	// names) sign in to URLs that carry no user of their own, so that a
	// password mounted from a Kubernetes Secret never sits in the
	// environment.
	User     string `env:"IMAGEPIPE_NATS_USER" doc:"a NATS user, for URLs that carry none; its password is in IMAGEPIPE_NATS_PASSWORD_FILE"`
	Password string `env:"IMAGEPIPE_NATS_PASSWORD_FILE,file" secret:"true" doc:"a file holding the NATS user's password (a mounted Kubernetes Secret; a trailing newline is ignored), which keeps it out of the environment"`
	// Nkey is a file holding an nkey seed (SU...), for servers whose
	// users are nkeys rather than passwords.
	Nkey string `env:"IMAGEPIPE_NATS_NKEY" doc:"a file holding a user nkey seed (SU…), for servers that authenticate users by nkey" takes:"a file's path"`
	// CA is a PEM file of the CAs that sign the servers' certificates,
	// for servers whose certificate the system roots do not vouch for.
	// Setting it turns TLS on, as a tls:// URL does.
	CA string `env:"IMAGEPIPE_NATS_CA" doc:"PEM file of the CA that signs the NATS servers' certificates (default: the system roots); setting it turns TLS on, as a tls:// URL does" takes:"a file's path"`
	// Cert and Key are a client certificate and its key (PEM), for
	// servers that verify clients (tls { verify: true }).
	Cert string `env:"IMAGEPIPE_NATS_CERT" doc:"client certificate (PEM) for servers that verify clients; set with IMAGEPIPE_NATS_KEY" takes:"a file's path"`
	Key  string `env:"IMAGEPIPE_NATS_KEY" doc:"the client certificate's key (PEM); set with IMAGEPIPE_NATS_CERT" takes:"a file's path"`
	// ConnectTimeout is how long a command tries to connect before it
	// fails, naming where it tried, and how long a command waits for a
	// replica it names to answer. The long-running functions ignore it:
	// they retry until NATS answers (ConnectRetrying).
	ConnectTimeout time.Duration `env:"IMAGEPIPE_CONNECT_TIMEOUT" envDefault:"5s" doc:"how long a command tries to reach NATS before it fails, naming the URL it tried, and how long imagepipe ctl … --instance ID asks for that replica; the long-running functions instead retry until NATS answers, logging where"`
}

// DefaultConnectTimeout is ConnectTimeout when none is set.
const DefaultConnectTimeout = 5 * time.Second

// Timeout is ConnectTimeout, or its default.
func (cfg Config) Timeout() time.Duration {
	if cfg.ConnectTimeout <= 0 {
		return DefaultConnectTimeout
	}
	return cfg.ConnectTimeout
}

// Validate checks everything connecting would, without connecting: the
// URLs, the files named, the settings that go together, placeholders.
func (cfg Config) Validate() error {
	cfg, _, err := cfg.effective()
	if err != nil {
		return err
	}
	var problems []error
	for _, raw := range strings.Split(cfg.URL, ",") {
		if err := checkServerURL(strings.TrimSpace(raw)); err != nil {
			problems = append(problems, err)
		}
	}
	if _, err := cfg.options(); err != nil {
		problems = append(problems, err)
	}
	if cfg.ConnectTimeout <= 0 {
		problems = append(problems, config.Invalid("IMAGEPIPE_CONNECT_TIMEOUT", cfg.ConnectTimeout.String(), "want a duration above zero, such as 5s"))
	}
	return errors.Join(problems...)
}

// checkServerURL accepts what nats.go dials: nats://, tls://, ws:// and
// wss:// URLs, or a bare host:port.
func checkServerURL(raw string) error {
	want := "want nats://HOST:PORT, tls://HOST:PORT, ws(s)://HOST:PORT or HOST:PORT, comma-separated"
	if raw == "" {
		return config.Invalid("IMAGEPIPE_NATS_URL", "", want)
	}
	if !strings.Contains(raw, "://") {
		raw = "nats://" + raw
	}
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return config.Invalid("IMAGEPIPE_NATS_URL", config.RedactURLs(raw), want)
	}
	switch u.Scheme {
	case "nats", "tls", "ws", "wss":
		return nil
	}
	return config.Invalid("IMAGEPIPE_NATS_URL", config.RedactURLs(raw), want)
}

// options are the settings' connect options: credentials and TLS. A
// placeholder password from the examples is refused here, before any
// connection is tried, so a copied example never reaches a server.
func (cfg Config) options() ([]nats.Option, error) {
	given := cfg.URL
	// A nats context's settings stand in for IMAGEPIPE_NATS_*, and the
	// errors below name those.
	cfg, _, err := cfg.effective()
	if err != nil {
		return nil, err
	}
	var opts []nats.Option
	if cfg.URL != given {
		opts = append(opts, servers(cfg.URL))
	}
	if err := secrets.CheckURLs("IMAGEPIPE_NATS_URL", cfg.URL); err != nil {
		return nil, err
	}
	// A missing file is a setting to fix, not an outage to wait out.
	for _, f := range []struct{ name, path string }{
		{"IMAGEPIPE_NATS_CREDS", cfg.Creds}, {"IMAGEPIPE_NATS_CA", cfg.CA},
		{"IMAGEPIPE_NATS_CERT", cfg.Cert}, {"IMAGEPIPE_NATS_KEY", cfg.Key}, {"IMAGEPIPE_NATS_NKEY", cfg.Nkey},
	} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			return nil, fmt.Errorf("nats: %s: %w", f.name, err)
		}
	}
	if pw := strings.TrimRight(cfg.Password, "\r\n"); cfg.User != "" || pw != "" {
		if err := secrets.Check("IMAGEPIPE_NATS_PASSWORD_FILE", pw); err != nil {
			return nil, fmt.Errorf("nats: %w", err)
		}
		opts = append(opts, nats.UserInfo(cfg.User, pw))
	}
	if cfg.Creds != "" {
		opts = append(opts, nats.UserCredentials(cfg.Creds))
	}
	if cfg.Nkey != "" {
		if cfg.Creds != "" {
			return nil, errors.New("nats: IMAGEPIPE_NATS_NKEY and IMAGEPIPE_NATS_CREDS both sign in: set one")
		}
		opt, err := nats.NkeyOptionFromSeed(cfg.Nkey)
		if err != nil {
			return nil, fmt.Errorf("nats: IMAGEPIPE_NATS_NKEY=%q: %w", cfg.Nkey, err)
		}
		opts = append(opts, opt)
	}
	if cfg.CA != "" {
		opts = append(opts, nats.RootCAs(cfg.CA))
	}
	if (cfg.Cert == "") != (cfg.Key == "") {
		return nil, errors.New("nats: IMAGEPIPE_NATS_CERT and IMAGEPIPE_NATS_KEY go together: set both for a client certificate, or neither")
	}
	if cfg.Cert != "" {
		opts = append(opts, nats.ClientCert(cfg.Cert, cfg.Key))
	}
	return opts, nil
}

// InboxPrefix is where the replies to a connection of the given role
// (ingest, convert, notify, cli, ...) arrive. Each NATS user in
// infra/nats/accounts.conf may read only its own role's inboxes, not the
// shared _INBOX.>, so no user can read replies meant for another.
func InboxPrefix(role string) string { return "_INBOX_" + role }

// Connect dials NATS as imagepipe-ROLE, with replies to
// InboxPrefix(role), for a command: it tries for cfg.Timeout() and then
// fails with an error that says where it tried. Once connected it
// reconnects for as long as the process lives.
func Connect(ctx context.Context, cfg Config, role string, log *slog.Logger) (*nats.Conn, error) {
	opts, err := cfg.connectOptions(role, log)
	if err != nil {
		return nil, err
	}
	deadline, cancel := context.WithTimeout(ctx, cfg.Timeout())
	defer cancel()
	var closedAfterTLS int
	for {
		nc, err := nats.Connect(cfg.URL, opts...)
		if err == nil {
			return nc, nil
		}
		if err := cfg.refusal(err, &closedAfterTLS); err != nil {
			return nil, fmt.Errorf("connect to NATS at %s (IMAGEPIPE_NATS_URL): %w", config.RedactURLs(cfg.Servers()), err)
		}
		select {
		case <-deadline.Done():
			return nil, fmt.Errorf("connect to NATS at %s (IMAGEPIPE_NATS_URL): %w; gave up after %s (IMAGEPIPE_CONNECT_TIMEOUT)",
				config.RedactURLs(cfg.Servers()), err, cfg.Timeout())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// ConnectRetrying is Connect for a long-running function: where NATS does
// not answer it waits and tries again, with back-off, for as long as ctx
// lasts, logging each retry and where it tried. A function started before
// its NATS (a reboot, a compose file) then simply waits for it.
func ConnectRetrying(ctx context.Context, cfg Config, role string, log *slog.Logger) (*nats.Conn, error) {
	opts, err := cfg.connectOptions(role, log)
	if err != nil {
		return nil, err
	}
	where := config.RedactURLs(cfg.Servers())
	wait := time.Second
	var closedAfterTLS int
	for attempt := 1; ; attempt++ {
		nc, err := nats.Connect(cfg.URL, opts...)
		if err == nil {
			if attempt > 1 {
				log.Info("connected to NATS", "url", where, "attempts", attempt)
			}
			return nc, nil
		}
		if err := cfg.refusal(err, &closedAfterTLS); err != nil {
			return nil, fmt.Errorf("connect to NATS at %s (IMAGEPIPE_NATS_URL): %w", where, err)
		}
		log.Warn("NATS not reachable; retrying", "url", where, "attempt", attempt, "retry_in", wait, "err", err)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("connect to NATS at %s (IMAGEPIPE_NATS_URL): %w (last error: %v)", where, ctx.Err(), err)
		case <-time.After(wait):
		}
		wait = min(wait*2, 30*time.Second)
	}
}

// closedAfterTLSLimit is how many connections in a row the server may
// close right after the TLS handshake before a client without a
// certificate concludes that the server wants one. Under TLS 1.3 the
// client's side of the handshake ends before the server has judged its
// certificate, and the server's alert is lost when the client's first
// write races it: all the client sees is a closed connection, which once
// may also be a server going down.
const closedAfterTLSLimit = 3

// refusal returns, for an error waiting will not change, that error with
// what to do about it, and nil for one worth waiting out. closedAfterTLS
// counts the connections in a row the server closed right after the TLS
// handshake.
func (cfg Config) refusal(err error, closedAfterTLS *int) error {
	const wantCert = "the server requires a client certificate: set IMAGEPIPE_NATS_CERT and IMAGEPIPE_NATS_KEY"
	if refused(err) {
		if cfg.Cert == "" && strings.Contains(err.Error(), "tls: certificate required") {
			return fmt.Errorf("%w; %s", err, wantCert)
		}
		return err
	}
	closed := errors.Is(err, nats.ErrTLS) &&
		(errors.Is(err, io.EOF) || errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET))
	if !closed || cfg.Cert != "" {
		*closedAfterTLS = 0
		return nil
	}
	if *closedAfterTLS++; *closedAfterTLS < closedAfterTLSLimit {
		return nil
	}
	return fmt.Errorf("%w (%d times in a row); most likely %s", err, *closedAfterTLS, wantCert)
}

// refused reports whether the server turned the credentials down, or the
// TLS handshake failed on a certificate, which waiting will not change:
// the server's certificate is not one the CA vouches for, or the server
// refused the client's (or its missing) certificate.
func refused(err error) bool {
	if errors.Is(err, nats.ErrAuthorization) || errors.Is(err, nats.ErrAuthExpired) || errors.Is(err, nats.ErrAuthRevoked) {
		return true
	}
	var verify *tls.CertificateVerificationError
	var unknownCA x509.UnknownAuthorityError
	var host x509.HostnameError
	var invalid x509.CertificateInvalidError
	if errors.As(err, &verify) || errors.As(err, &unknownCA) || errors.As(err, &host) || errors.As(err, &invalid) {
		return true
	}
	// The server's alerts reach the client only as text.
	msg := err.Error()
	for _, alert := range []string{"tls: certificate required", "tls: bad certificate", "tls: unknown certificate authority", "tls: expired certificate"} {
		if strings.Contains(msg, alert) {
			return true
		}
	}
	return false
}

// connectOptions are the options of every connection: its name, its inbox
// prefix, endless reconnects once connected, logs of losing and finding
// the server, and the settings' credentials and TLS.
func (cfg Config) connectOptions(role string, log *slog.Logger) ([]nats.Option, error) {
	own, err := cfg.options()
	if err != nil {
		return nil, err
	}
	opts := []nats.Option{
		nats.Name("imagepipe-" + role),
		nats.CustomInboxPrefix(InboxPrefix(role)),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(time.Second),
		nats.RetryOnFailedConnect(false),
		// A dial may not outlast the whole wait a command allows.
		nats.Timeout(min(2*time.Second, cfg.Timeout())),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("nats disconnected", "err", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) { log.Info("nats reconnected", "server", nc.ConnectedUrlRedacted()) }),
	}
	return append(opts, own...), nil
}

// Close ends a long-running function's connection without losing what it
// was still saying: subscriptions drain, so a control request being
// answered (a drain or stop, which is what ends the function) gets its
// reply out, and pending publishes are flushed. A plain Close would race
// the reply and leave the operator's `ctl drain` waiting for an answer
// that was never sent. It waits at most within, then closes anyway. It
// takes over the connection's closed handler to learn when the drain is
// done.
func Close(nc *nats.Conn, within time.Duration) {
	closed := make(chan struct{})
	var once sync.Once
	nc.SetClosedHandler(func(*nats.Conn) { once.Do(func() { close(closed) }) })
	if err := nc.Drain(); err != nil {
		nc.Close()
		return
	}
	t := time.NewTimer(within)
	defer t.Stop()
	select {
	case <-closed:
	case <-t.C:
	}
	nc.Close()
}
