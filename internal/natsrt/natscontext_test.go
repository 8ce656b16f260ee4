package natsrt_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"

	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/natstest"
)

// startNATS starts an embedded server with opts' authorization.
func startNATS(t *testing.T, opts *server.Options) *server.Server {
	t.Helper()
	return natstest.StartServer(t, opts)
}

// natsConfigHome is an empty configuration directory for the nats CLI,
// as XDG_CONFIG_HOME, with no context selected.
func natsConfigHome(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", dir)
	t.Setenv("NATS_CONTEXT", "")
	if err := os.MkdirAll(filepath.Join(dir, "nats", "context"), 0o700); err != nil {
		t.Fatal(err)
	}
	return dir
}

// saveContext writes a context as `nats context save NAME` does.
func saveContext(t *testing.T, dir, name string, fields map[string]any) {
	t.Helper()
	b, err := json.MarshalIndent(fields, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "nats", "context", name+".json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// selectContext selects name as `nats context select NAME` does.
func selectContext(t *testing.T, dir, name string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "nats", "context.txt"), []byte(name), 0o600); err != nil {
		t.Fatal(err)
	}
}

func connectWith(t *testing.T, cfg natsrt.Config) (string, error) {
	t.Helper()
	cfg.ConnectTimeout = 2 * time.Second
	if err := cfg.Validate(); err != nil {
		return "", err
	}
	nc, err := natsrt.Connect(context.Background(), cfg, "cli", slog.New(slog.DiscardHandler))
	if err != nil {
		return "", err
	}
	defer nc.Close()
	return nc.ConnectedUrl(), nil
}

// TestWithoutAURLTheSelectedNatsContextConnects connects with no
// IMAGEPIPE_NATS_URL, to the server and as the user of the nats context
// the nats CLI would use: the one selected in context.txt, or the one
// NATS_CONTEXT names; IMAGEPIPE_NATS_URL, once set, wins.
func TestWithoutAURLTheSelectedNatsContextConnects(t *testing.T) {
	s := startNATS(t, &server.Options{Users: []*server.User{{Username: "ops", Password: "c8e1f04b9a7d"}}})
	other := startNATS(t, &server.Options{Users: []*server.User{{Username: "dev", Password: "5d2a7c9e31f0"}}})
	dir := natsConfigHome(t)
	saveContext(t, dir, "prod", map[string]any{"description": "the cluster", "url": s.ClientURL(), "user": "ops", "password": "c8e1f04b9a7d"})
	saveContext(t, dir, "lab", map[string]any{"url": other.ClientURL(), "user": "dev", "password": "5d2a7c9e31f0"})

	// Nothing selected: the default URL, where nothing listens here.
	if got := (natsrt.Config{}).Servers(); got != natsrt.DefaultURL {
		t.Fatalf("no context selected: servers %q, want %q", got, natsrt.DefaultURL)
	}

	selectContext(t, dir, "prod")
	if got, err := connectWith(t, natsrt.Config{}); err != nil || got != s.ClientURL() {
		t.Fatalf("selected context prod: connected to %q (%v), want %s", got, err, s.ClientURL())
	}

	t.Setenv("NATS_CONTEXT", "lab")
	if got, err := connectWith(t, natsrt.Config{}); err != nil || got != other.ClientURL() {
		t.Fatalf("NATS_CONTEXT=lab: connected to %q (%v), want %s", got, err, other.ClientURL())
	}

	// The URL given wins, and the context's user with it is not used.
	if _, err := connectWith(t, natsrt.Config{URL: s.ClientURL()}); err == nil {
		t.Fatal("IMAGEPIPE_NATS_URL set: signed in with the context's user anyway")
	}

	// A context whose password is wrong is refused: it is the context's
	// user that signs in.
	saveContext(t, dir, "lab", map[string]any{"url": other.ClientURL(), "user": "dev", "password": "wrong-4f1e2d"})
	if _, err := connectWith(t, natsrt.Config{}); err == nil {
		t.Fatal("a wrong password in the context signed in")
	}
}

// TestNatsContextNkeyAndHomeDirectory reads the context from
// ~/.config/nats with no XDG_CONFIG_HOME, signing in with its nkey seed
// file written as ~/… in the context.
func TestNatsContextNkeyAndHomeDirectory(t *testing.T) {
	user, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := user.PublicKey()
	seed, _ := user.Seed()
	s := startNATS(t, &server.Options{Nkeys: []*server.NkeyUser{{Nkey: pub}}})

	home := t.TempDir()
	t.Setenv("HOME", home)
	t.Setenv("XDG_CONFIG_HOME", "")
	t.Setenv("NATS_CONTEXT", "")
	if err := os.WriteFile(filepath.Join(home, "user.nk"), seed, 0o400); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(home, ".config")
	if err := os.MkdirAll(filepath.Join(dir, "nats", "context"), 0o700); err != nil {
		t.Fatal(err)
	}
	saveContext(t, dir, "nk", map[string]any{"url": s.ClientURL(), "nkey": "~/user.nk"})
	selectContext(t, dir, "nk")
	if got, err := connectWith(t, natsrt.Config{}); err != nil || got != s.ClientURL() {
		t.Fatalf("context nk: connected to %q (%v), want %s", got, err, s.ClientURL())
	}
}

func TestNatsContextProblemsAreRefusedBeforeConnecting(t *testing.T) {
	dir := natsConfigHome(t)
	saveContext(t, dir, "tok", map[string]any{"url": "nats://127.0.0.1:4222", "token": "s3cr3t-token"})
	saveContext(t, dir, "missing-ca", map[string]any{"url": "tls://127.0.0.1:4222", "ca": filepath.Join(dir, "absent.pem")})
	for _, tt := range []struct{ name, want string }{
		{"tok", "sets token, which imagepipe does not apply"},
		{"missing-ca", "nats context missing-ca: its ca"},
		{"absent", "nats context absent"},
		{"../x", "want the name of a context"},
	} {
		t.Setenv("NATS_CONTEXT", tt.name)
		err := (natsrt.Config{ConnectTimeout: time.Second}).Validate()
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("NATS_CONTEXT=%s: Validate = %v, want %q", tt.name, err, tt.want)
		}
		if err != nil && strings.Contains(err.Error(), "s3cr3t-token") {
			t.Errorf("NATS_CONTEXT=%s: the error shows the token: %v", tt.name, err)
		}
	}
}
