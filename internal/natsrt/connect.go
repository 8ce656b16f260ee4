package natsrt

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go"
)

// Config is how to reach NATS.
type Config struct {
	URL   string `env:"IMAGEPIPE_NATS_URL" envDefault:"nats://127.0.0.1:4222"`
	Creds string `env:"IMAGEPIPE_NATS_CREDS"`
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
	if cfg.Creds != "" {
		opts = append(opts, nats.UserCredentials(cfg.Creds))
	}
	deadline, cancel := context.WithTimeout(ctx, 20*time.Second)
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
