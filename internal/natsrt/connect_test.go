package natsrt_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"

	"github.com/imagepipe/imagepipe/internal/freeport"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/natstest"
	"github.com/imagepipe/imagepipe/test/stack"
)

// closedPort is a loopback port nothing listens on, and nothing else is
// handed while the test waits to start a server there.
func closedPort(t *testing.T) int {
	t.Helper()
	port, err := freeport.Pick()
	if err != nil {
		t.Fatal(err)
	}
	return port
}

func TestConnectGivesUpNamingTheURLItTriedWithoutItsPassword(t *testing.T) {
	url := fmt.Sprintf("nats://convert:hunter2-not-shown@127.0.0.1:%d", closedPort(t))
	cfg := natsrt.Config{URL: url, ConnectTimeout: time.Second}
	_, err := natsrt.Connect(context.Background(), cfg, "cli", slog.New(slog.DiscardHandler))
	if err == nil {
		t.Fatal("connected to a closed port")
	}
	for _, want := range []string{strings.Replace(url, "convert:hunter2-not-shown", "redacted", 1), "IMAGEPIPE_NATS_URL", "gave up after 1s", "IMAGEPIPE_CONNECT_TIMEOUT"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "hunter2") {
		t.Errorf("error %q shows the password", err)
	}
}

func TestConnectRetryingWaitsForNATSAndSaysWhereItTries(t *testing.T) {
	port := closedPort(t)
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	var logs natstest.LogBuffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(2*time.Minute))
	defer cancel()

	type result struct {
		err error
	}
	done := make(chan result, 1)
	go func() {
		nc, err := natsrt.ConnectRetrying(ctx, natsrt.Config{URL: url, ConnectTimeout: time.Second}, "convert", log)
		if err == nil {
			nc.Close()
		}
		done <- result{err}
	}()

	// It keeps trying, past the commands' timeout, and says where.
	for !strings.Contains(logs.String(), "attempt=2") {
		select {
		case r := <-done:
			t.Fatalf("ConnectRetrying returned %v with no server, want it to keep trying", r.err)
		case <-ctx.Done():
			t.Fatalf("no second attempt logged: %s", logs.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
	if !strings.Contains(logs.String(), "NATS not reachable; retrying") || !strings.Contains(logs.String(), "url="+url) {
		t.Fatalf("retries do not say where they try: %s", logs.String())
	}

	// The server comes up on that port: the function connects.
	natstest.StartServer(t, &server.Options{Port: port})
	select {
	case r := <-done:
		if r.err != nil {
			t.Fatalf("ConnectRetrying = %v once the server is up", r.err)
		}
	case <-ctx.Done():
		t.Fatalf("not connected once the server is up: %s", logs.String())
	}
}

func TestConnectRetryingStopsWhenTheFunctionStops(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	url := fmt.Sprintf("nats://127.0.0.1:%d", closedPort(t))
	_, err := natsrt.ConnectRetrying(ctx, natsrt.Config{URL: url}, "convert", slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), url) || !strings.Contains(err.Error(), "context canceled") {
		t.Fatalf("err = %v, want the URL and the cancellation", err)
	}
}

func TestNATSNkeySeedFileSignsIn(t *testing.T) {
	user, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := user.PublicKey()
	seed, _ := user.Seed()
	s := natstest.StartServer(t, &server.Options{Nkeys: []*server.NkeyUser{{Nkey: pub}}})
	file := filepath.Join(t.TempDir(), "user.nk")
	if err := os.WriteFile(file, seed, 0o400); err != nil {
		t.Fatal(err)
	}
	cfg := natsrt.Config{URL: s.ClientURL(), Nkey: file, ConnectTimeout: 5 * time.Second}
	nc, err := natsrt.Connect(context.Background(), cfg, "convert", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatalf("connect with the nkey seed: %v", err)
	}
	nc.Close()

	// Without the seed the server refuses: it is the seed that signs in.
	cfg.Nkey = ""
	cfg.ConnectTimeout = time.Second
	if _, err := natsrt.Connect(context.Background(), cfg, "convert", slog.New(slog.DiscardHandler)); err == nil {
		t.Fatal("signed in without the nkey")
	}
}

func TestNATSConfigValidateNamesEachProblem(t *testing.T) {
	for _, tt := range []struct {
		cfg  natsrt.Config
		want string
	}{
		{natsrt.Config{URL: "http://127.0.0.1:4222", ConnectTimeout: time.Second}, `IMAGEPIPE_NATS_URL="http://127.0.0.1:4222"`},
		{natsrt.Config{URL: "nats://127.0.0.1:4222", CA: "/nonexistent/ca.pem", ConnectTimeout: time.Second}, "IMAGEPIPE_NATS_CA"},
		{natsrt.Config{URL: "nats://127.0.0.1:4222", Nkey: "/nonexistent/user.nk", ConnectTimeout: time.Second}, "IMAGEPIPE_NATS_NKEY"},
		{natsrt.Config{URL: "nats://127.0.0.1:4222", Cert: "/etc/hostname", ConnectTimeout: time.Second}, "IMAGEPIPE_NATS_KEY go together"},
		{natsrt.Config{URL: "nats://127.0.0.1:4222"}, "IMAGEPIPE_CONNECT_TIMEOUT"},
	} {
		err := tt.cfg.Validate()
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("Validate(%+v) = %v, want %q", tt.cfg, err, tt.want)
		}
	}
	if err := (natsrt.Config{URL: "nats://a:4222, tls://b:4222,c:4222", ConnectTimeout: time.Second}).Validate(); err != nil {
		t.Errorf("a valid list refused: %v", err)
	}
}
