package main

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/natstest"
)

// awaitLog waits until the log holds want, or the function has returned.
func awaitLog(t *testing.T, logs *natstest.LogBuffer, want string, done <-chan error) {
	t.Helper()
	deadline := time.Now().Add(scaled(3 * time.Minute))
	for !strings.Contains(logs.String(), want) {
		select {
		case err := <-done:
			t.Fatalf("the function returned %v before logging %q; log:\n%s", err, want, logs)
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q in the log:\n%s", want, logs)
		}
	}
}

func TestFunctionWaitsForJetStreamToBeEnabledThenStarts(t *testing.T) {
	cleanConfig(t)
	srv := natstest.StartServer(t, &server.Options{}) // no JetStream yet
	t.Setenv("IMAGEPIPE_NATS_URL", srv.ClientURL())

	logs := &natstest.LogBuffer{}
	ctx, cancel := context.WithTimeout(context.Background(), scaled(10*time.Minute))
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- runFunction(ctx, ctx, "notify", slog.New(slog.NewTextHandler(logs, nil))) }()

	awaitLog(t, logs, "JetStream not ready; waiting", done)
	if !strings.Contains(logs.String(), "for=JetStream") {
		t.Fatalf("the log does not say what the function waits for:\n%s", logs)
	}
	if err := srv.EnableJetStream(&server.JetStreamConfig{StoreDir: t.TempDir()}); err != nil {
		t.Fatal(err)
	}
	awaitLog(t, logs, "msg=started", done)

	// It bound its consumer, on the streams it provisioned itself.
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	if _, err := js.Consumer(ctx, events.StreamResults, "notify"); err != nil {
		t.Fatalf("consumer notify on %s: %v", events.StreamResults, err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("runFunction = %v after a stop, want nil; log:\n%s", err, logs)
	}
}

func TestFunctionWhoseUserMayNotUseJetStreamFailsSayingSo(t *testing.T) {
	cleanConfig(t)
	srv := natstest.StartServer(t, &server.Options{
		JetStream: true,
		StoreDir:  t.TempDir(),
		Users: []*server.User{{
			Username: "fn-no-js",
			Password: "b1f0d9c2e7a4",
			Permissions: &server.Permissions{
				Publish: &server.SubjectPermission{Allow: []string{">"}, Deny: []string{"$JS.API.>"}},
			},
		}},
	})
	pw := filepath.Join(t.TempDir(), "password")
	if err := os.WriteFile(pw, []byte("b1f0d9c2e7a4\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("IMAGEPIPE_NATS_URL", srv.ClientURL())
	t.Setenv("IMAGEPIPE_NATS_USER", "fn-no-js")
	t.Setenv("IMAGEPIPE_NATS_PASSWORD_FILE", pw)

	// Were the refusal taken for a slow JetStream, the function would
	// wait until this context ends.
	ctx, cancel := context.WithTimeout(context.Background(), scaled(10*time.Minute))
	defer cancel()
	logs := &natstest.LogBuffer{}
	err := runFunction(ctx, ctx, "notify", slog.New(slog.NewTextHandler(logs, nil)))
	if err == nil || ctx.Err() != nil {
		t.Fatalf("runFunction = %v (context %v), want a permission error before the context ends", err, ctx.Err())
	}
	for _, want := range []string{"permissions violation", "$JS.API", "IMAGEPIPE_NATS_USER"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("runFunction = %v, want it to mention %q", err, want)
		}
	}
	if strings.Contains(logs.String(), "JetStream not ready; waiting") {
		t.Errorf("a permission error was waited on as an outage:\n%s", logs)
	}
}
