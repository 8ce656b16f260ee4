package natsrt

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// startupAttempt bounds one try of a start-up step: a request a cluster
// lost while it elected a leader is asked again rather than waited on.
const startupAttempt = 10 * time.Second

// WaitJetStream runs step, a long-running function's start-up call to
// JetStream (provisioning a stream, binding a consumer), until it
// succeeds. While JetStream cannot answer yet (a cluster still electing
// its leaders, a server or account whose JetStream is not on yet, a
// loaded server timing out), it logs what it waits for and tries again
// with back-off, for as long as ctx lasts: a function started beside a
// slow cluster waits for it instead of exiting. Anything else, a
// permission the NATS user lacks or a setting JetStream refuses, fails at
// once, since waiting will not change it.
func WaitJetStream(ctx context.Context, nc *nats.Conn, log *slog.Logger, what string, step func(context.Context) error) error {
	wait := time.Second
	for attempt := 1; ; attempt++ {
		// Only a violation during this attempt explains it; one from
		// earlier in the connection's life does not.
		before := nc.LastError()
		actx, cancel := context.WithTimeout(ctx, startupAttempt)
		stopWatching := cancelOnViolation(actx, nc, before, cancel)
		err := step(actx)
		stopWatching()
		cancel()
		if err == nil {
			if attempt > 1 {
				log.Info("JetStream ready", "for", what, "attempts", attempt)
			}
			return nil
		}
		if v := violation(nc); v != nil && v != before {
			return fmt.Errorf("%s: %w", what, deniedError(v))
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%s: %w (last error: %v)", what, ctx.Err(), err)
		}
		if !startupTransient(err) {
			return fmt.Errorf("%s: %w", what, err)
		}
		log.Warn("JetStream not ready; waiting", "for", what, "attempt", attempt, "retry_in", wait, "err", err, "hint", hint(err))
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w (last error: %v)", what, ctx.Err(), err)
		case <-time.After(wait):
		}
		wait = min(wait*2, 30*time.Second)
	}
}

// startupTransient reports errors JetStream gives while it cannot answer
// yet but will: timeouts, no responders (no JetStream server, or none
// with a leader), JetStream not enabled for the server or the account yet,
// "temporarily unavailable" (503) and the resources and peers a forming
// cluster does not have yet.
func startupTransient(err error) bool {
	if errors.Is(err, context.Canceled) {
		return false
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrTimeout),
		errors.Is(err, nats.ErrNoResponders), errors.Is(err, jetstream.ErrNoStreamResponse),
		errors.Is(err, jetstream.ErrJetStreamNotEnabled), errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount),
		errors.Is(err, nats.ErrJetStreamNotEnabled), errors.Is(err, nats.ErrJetStreamNotEnabledForAccount),
		errors.Is(err, nats.ErrDisconnected), errors.Is(err, nats.ErrConnectionReconnecting):
		return true
	}
	var api *jetstream.APIError
	if errors.As(err, &api) {
		// 10005: insufficient resources; 10008: no suitable peers
		// (both while a cluster's peers are still joining).
		return api.Code == 503 || api.Code == 408 || api.ErrorCode == 10005 || api.ErrorCode == 10008
	}
	return false
}

// Denied returns the permission error behind err, or nil. A NATS server
// drops a request its user may not publish and says so only on the
// connection, so the request itself just times out; the connection's last
// error tells such a timeout from a slow JetStream.
func Denied(nc *nats.Conn, err error) error {
	if nc == nil || !startupTransient(err) {
		return nil
	}
	if v := violation(nc); v != nil {
		return deniedError(v)
	}
	return nil
}

// violation is the connection's last error if it is a permission
// violation on the JetStream API.
func violation(nc *nats.Conn) error {
	last := nc.LastError()
	if errors.Is(last, nats.ErrPermissionViolation) && strings.Contains(last.Error(), "$JS.") {
		return last
	}
	return nil
}

func deniedError(v error) error {
	return fmt.Errorf("%w: the NATS user may not use the JetStream API it needs; grant it in the server's authorization (see infra/nats/accounts.conf) or sign in as another user (IMAGEPIPE_NATS_USER, IMAGEPIPE_NATS_CREDS, IMAGEPIPE_NATS_NKEY)", v)
}

// cancelOnViolation cancels an attempt as soon as the server reports a
// permission violation on the JetStream API, which arrives at once, rather
// than letting the dropped request run into its timeout. The returned func
// stops watching.
func cancelOnViolation(ctx context.Context, nc *nats.Conn, before error, cancel context.CancelFunc) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(50 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-t.C:
				if v := violation(nc); v != nil && v != before {
					cancel()
					return
				}
			}
		}
	})
	return func() {
		close(done)
		wg.Wait()
	}
}

// hint says in a log what an operator may look at while a function waits.
func hint(err error) string {
	switch {
	case errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount), errors.Is(err, nats.ErrJetStreamNotEnabledForAccount):
		return "the NATS account has no JetStream (yet): enable it for the account"
	case errors.Is(err, jetstream.ErrJetStreamNotEnabled), errors.Is(err, nats.ErrJetStreamNotEnabled), errors.Is(err, nats.ErrNoResponders):
		return "no JetStream answers: is it enabled on the server, and has the cluster elected its leader?"
	}
	return "JetStream is slow or its cluster is electing a leader"
}
