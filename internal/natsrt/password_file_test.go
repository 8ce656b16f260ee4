package natsrt_test

import (
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/caarlos0/env/v11"
	"github.com/nats-io/nats-server/v2/server"

	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/natstest"
	"github.com/imagepipe/imagepipe/internal/secrets"
)

// startWithUser runs a NATS server that admits only user "convert" with
// the given password.
func startWithUser(t *testing.T, password string) string {
	t.Helper()
	users := []*server.User{{Username: "convert", Password: password}}
	return natstest.StartServer(t, &server.Options{Users: users}).ClientURL()
}

// configFromEnv parses the settings as every command does, with the
// password in a file as a Kubernetes Secret mounts it (newline and all).
func configFromEnv(t *testing.T, url, user, password string) natsrt.Config {
	t.Helper()
	file := filepath.Join(t.TempDir(), "nats-password")
	if err := os.WriteFile(file, []byte(password+"\n"), 0o400); err != nil {
		t.Fatal(err)
	}
	t.Setenv("IMAGEPIPE_NATS_URL", url)
	t.Setenv("IMAGEPIPE_NATS_USER", user)
	t.Setenv("IMAGEPIPE_NATS_PASSWORD_FILE", file)
	t.Setenv("IMAGEPIPE_CONNECT_TIMEOUT", "2s")
	cfg, err := env.ParseAs[natsrt.Config]()
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestNATSPasswordFromFileSignsIn(t *testing.T) {
	const password = "3f1c0e2a9b7d4c5e8f6a1b2c3d4e5f60"
	url := startWithUser(t, password)

	nc, err := natsrt.Connect(context.Background(), configFromEnv(t, url, "convert", password), "convert", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("connect with the password file: %v", err)
	}
	nc.Close()

	if _, err := natsrt.Connect(context.Background(), configFromEnv(t, url, "convert", "not-"+password), "convert", slog.New(slog.DiscardHandler)); err == nil {
		t.Fatal("a wrong password in the file signed in: the file is not what is used")
	}
}

func TestNATSPasswordFileWithPlaceholderIsRefused(t *testing.T) {
	cfg := configFromEnv(t, "nats://127.0.0.1:1", "convert", "change-me-convert")
	_, err := natsrt.Connect(context.Background(), cfg, "convert", slog.New(slog.DiscardHandler))
	if !errors.Is(err, secrets.ErrPlaceholder) {
		t.Fatalf("err = %v, want a placeholder refusal", err)
	}
}
