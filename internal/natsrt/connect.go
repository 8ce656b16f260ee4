package natsrt

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/imagepipe/imagepipe/internal/secrets"
)

// Config is how to reach NATS.
type Config struct {
	URL   string `env:"IMAGEPIPE_NATS_URL" envDefault:"nats://127.0.0.1:4222"`
	Creds string `env:"IMAGEPIPE_NATS_CREDS"`
	// User and Password (read from the file IMAGEPIPE_NATS_PASSWORD_FILE
	// names) sign in to URLs that carry no user of their own, so that a
	// password mounted from a Kubernetes Secret never sits in the
	// environment.
	User     string `env:"IMAGEPIPE_NATS_USER"`
	Password string `env:"IMAGEPIPE_NATS_PASSWORD_FILE,file"`
	// CA is a PEM file of the CAs that sign the servers' certificates,
	// for servers whose certificate the system roots do not vouch for.
	// Setting it turns TLS on, as a tls:// URL does.
	CA string `env:"IMAGEPIPE_NATS_CA"`
	// Cert and Key are a client certificate and its key (PEM), for
	// servers that verify clients (tls { verify: true }).
	Cert string `env:"IMAGEPIPE_NATS_CERT"`
	Key  string `env:"IMAGEPIPE_NATS_KEY"`
	// ConnectTimeout is how long connecting may take before it fails,
	// and how long a command waits for a replica it names to answer:
	// both are NATS round trips that a loaded machine or a distant
	// server slows down. Zero means DefaultConnectTimeout.
	ConnectTimeout time.Duration `env:"IMAGEPIPE_CONNECT_TIMEOUT" envDefault:"20s"`
}

// DefaultConnectTimeout is ConnectTimeout when none is set.
const DefaultConnectTimeout = 20 * time.Second

// Timeout is ConnectTimeout, or its default.
func (cfg Config) Timeout() time.Duration {
	if cfg.ConnectTimeout <= 0 {
		return DefaultConnectTimeout
	}
	return cfg.ConnectTimeout
}

// options are the settings' connect options: credentials and TLS. A
// placeholder password from the examples is refused here, before any
// connection is tried, so a copied example never reaches a server.
func (cfg Config) options() ([]nats.Option, error) {
	if err := secrets.CheckURLs("IMAGEPIPE_NATS_URL", cfg.URL); err != nil {
		return nil, err
	}
	// A missing file is a setting to fix, not an outage to wait out.
	for _, f := range []struct{ name, path string }{
		{"IMAGEPIPE_NATS_CREDS", cfg.Creds}, {"IMAGEPIPE_NATS_CA", cfg.CA},
		{"IMAGEPIPE_NATS_CERT", cfg.Cert}, {"IMAGEPIPE_NATS_KEY", cfg.Key},
	} {
		if f.path == "" {
			continue
		}
		if _, err := os.Stat(f.path); err != nil {
			return nil, fmt.Errorf("nats: %s: %w", f.name, err)
		}
	}
	var opts []nats.Option
	if pw := strings.TrimRight(cfg.Password, "\r\n"); cfg.User != "" || pw != "" {
		if err := secrets.Check("IMAGEPIPE_NATS_PASSWORD_FILE", pw); err != nil {
			return nil, fmt.Errorf("nats: %w", err)
		}
		opts = append(opts, nats.UserInfo(cfg.User, pw))
	}
	if cfg.Creds != "" {
		opts = append(opts, nats.UserCredentials(cfg.Creds))
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

// Connect dials NATS as imagepipe-ROLE, with replies to InboxPrefix(role),
// and keeps reconnecting for as long as the process lives: a NATS outage
// pauses work, it never ends the process.
func Connect(ctx context.Context, cfg Config, role string, log *slog.Logger) (*nats.Conn, error) {
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
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("nats disconnected", "err", err)
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) { log.Info("nats reconnected", "server", nc.ConnectedUrlRedacted()) }),
	}
	opts = append(opts, own...)
	deadline, cancel := context.WithTimeout(ctx, cfg.Timeout())
	defer cancel()
	var lastErr error
	for {
		nc, err := nats.Connect(cfg.URL, opts...)
		if err == nil {
			return nc, nil
		}
		lastErr = err
		select {
		case <-deadline.Done():
			// The URL may hold a password; report the error only.
			return nil, fmt.Errorf("connect to nats: %w", lastErr)
		case <-time.After(500 * time.Millisecond):
		}
	}
}
