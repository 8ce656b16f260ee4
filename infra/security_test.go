package infra

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/secrets"
	"github.com/imagepipe/imagepipe/test/stack"
)

const tlsExample = "nats/tls.example.conf"

// TestNATSOnlyTheOperatorMakesIngestFetchURLsOrStopsReplicas runs
// single.conf with an ingest replica answering imports and a convert
// replica answering stop, under their own users: the cli user's requests
// are refused by the server and never reach them; the operator's are
// answered.
func TestNATSOnlyTheOperatorMakesIngestFetchURLsOrStopsReplicas(t *testing.T) {
	opts, _, log := singleNode(t)
	var reached atomic.Int32
	serve := func(user, name, subject string) {
		c := userConn(t, opts, user)
		svc, err := micro.AddService(c.Conn, micro.Config{Name: name, Version: "1.0.0"})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = svc.Stop() })
		err = svc.AddEndpoint("x", micro.HandlerFunc(func(r micro.Request) {
			reached.Add(1)
			_ = r.Respond([]byte(`{}`))
		}), micro.WithEndpointSubject(subject))
		if err != nil {
			t.Fatal(err)
		}
	}
	stop := events.ReplicaSubject("convert", events.VerbStop)
	serve("ingest", "imagepipe-intake", events.SubjectImport)
	serve("convert", "imagepipe-convert", stop)
	serve("convert", "imagepipe-convert", events.ReplicaSubject("convert", events.VerbStatus))
	body := []byte(`{"url":"http://169.254.169.254/latest/meta-data/"}`)

	cli := userConn(t, opts, "cli")
	for _, subj := range []string{events.SubjectImport, stop, events.ReplicaSubject("ingest", events.VerbDrain), events.ReplicaSubject("convert", events.VerbPause)} {
		if _, err := cli.Request(subj, body, 500*time.Millisecond); err == nil {
			t.Errorf("cli: %s was answered", subj)
		}
		cli.refused(t, "publish", subj)
	}
	if n := reached.Load(); n != 0 {
		t.Fatalf("%d of cli's refused requests reached a replica", n)
	}
	// What cli is for still works.
	if _, err := cli.Request(events.ReplicaSubject("convert", events.VerbStatus), nil, 5*time.Second); err != nil {
		t.Errorf("cli: status: %v", err)
	}

	operator := userConn(t, opts, "operator")
	for _, subj := range []string{events.SubjectImport, stop} {
		if _, err := operator.Request(subj, body, 5*time.Second); err != nil {
			t.Errorf("operator: %s: %v", subj, err)
		}
	}
	if n := reached.Load(); n != 3 {
		t.Errorf("replicas answered %d requests, want cli's status and the operator's two", n)
	}
	for _, v := range log.Violations() {
		if !strings.Contains(v, "cli") {
			t.Errorf("the server refused someone other than cli: %s", v)
		}
	}
}

// certs are a throwaway CA and the certificates tls.example.conf names,
// valid for loopback.
type certs struct{ dir, ca string }

func makeCerts(t *testing.T) certs {
	t.Helper()
	pki := stack.NewPKI(t)
	pki.Issue(t, "server", x509.ExtKeyUsageServerAuth)
	pki.Issue(t, "route", x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth)
	return certs{dir: pki.Dir, ca: pki.CA}
}

// tlsConfig is tls.example.conf as shipped, its certificate paths moved to
// c, beside a copy of accounts.conf.
func tlsConfig(t *testing.T, c certs) string {
	t.Helper()
	dir := t.TempDir()
	b, err := os.ReadFile(tlsExample)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "/etc/nats/certs/") {
		t.Fatal("tls.example.conf names no certificates under /etc/nats/certs/")
	}
	conf := strings.ReplaceAll(string(b), "/etc/nats/certs/", c.dir+"/")
	acc, err := os.ReadFile("nats/accounts.conf")
	if err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{"tls.conf": []byte(conf), "accounts.conf": acc} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(dir, "tls.conf")
}

// TestNATSTLSExampleConfigPassesTheCheckAndEncryptsClientsAndRoutes: the
// example passes the server's own check, two nodes run from it form a
// route over mutual TLS, and a function's connection (natsrt.Connect, as
// every command makes it) gets in with a tls:// URL and IMAGEPIPE_NATS_CA,
// and not without the CA or over plain text.
func TestNATSTLSExampleConfigPassesTheCheckAndEncryptsClientsAndRoutes(t *testing.T) {
	c := makeCerts(t)
	conf := tlsConfig(t, c)
	if err := SetNATSSecrets(); err != nil {
		t.Fatal(err)
	}
	opts, err := server.ProcessConfigFile(conf)
	if err != nil {
		t.Fatalf("nats-server -t: %v", err)
	}
	if opts.TLSConfig == nil || opts.Cluster.TLSConfig == nil || opts.Cluster.TLSConfig.ClientAuth != tls.RequireAndVerifyClientCert || !loopbackHost(opts.HTTPHost) {
		t.Fatalf("client TLS %v, route TLS %v, monitoring on %q: want TLS on both, route certificates verified, monitoring on loopback",
			opts.TLSConfig != nil, opts.Cluster.TLSConfig, opts.HTTPHost)
	}

	ports, cports, routes := clusterPorts(t, 2)
	var nodes []*server.Server
	for i := range 2 {
		o, err := LoadNATS(NATSNode{Config: conf, StoreDir: t.TempDir(), Port: ports[i], ClusterPort: cports[i], Routes: routes})
		if err != nil {
			t.Fatal(err)
		}
		o.ServerName = fmt.Sprintf("nats-%d", i+1)
		nodes = append(nodes, startNode(t, o))
		opts = o
	}
	deadline := time.Now().Add(20 * time.Second)
	for nodes[0].NumRoutes() == 0 || nodes[1].NumRoutes() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the two nodes formed no route over TLS")
		}
		time.Sleep(50 * time.Millisecond)
	}

	pw, err := Password(opts, "cli")
	if err != nil {
		t.Fatal(err)
	}
	url := func(scheme string) string {
		return fmt.Sprintf("%s://cli:%s@127.0.0.1:%d", scheme, pw, ports[0])
	}
	log := slog.New(slog.DiscardHandler)
	connect := func(cfg natsrt.Config) error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		nc, err := natsrt.Connect(ctx, cfg, "cli", log)
		if err == nil {
			defer nc.Close()
			if !nc.TLSRequired() {
				return errors.New("connected without TLS")
			}
			_, err = nc.TLSConnectionState()
		}
		return err
	}
	if err := connect(natsrt.Config{URL: url("tls"), CA: c.ca}); err != nil {
		t.Errorf("tls:// with IMAGEPIPE_NATS_CA: %v", err)
	}
	if err := connect(natsrt.Config{URL: url("nats"), CA: c.ca}); err != nil {
		t.Errorf("nats:// with IMAGEPIPE_NATS_CA (the CA turns TLS on): %v", err)
	}
	if err := connect(natsrt.Config{URL: url("tls")}); err == nil {
		t.Error("connected with no CA that vouches for the server")
	}
	plain, err := nats.Connect(url("nats"), nats.MaxReconnects(0))
	if err == nil {
		plain.Close()
		t.Error("a plain-text client was let in")
	}
	if err := connect(natsrt.Config{URL: url("tls"), CA: c.ca, Cert: filepath.Join(c.dir, "route.pem")}); err == nil || !strings.Contains(err.Error(), "IMAGEPIPE_NATS_KEY") {
		t.Errorf("a client certificate without its key: %v, want a refusal naming IMAGEPIPE_NATS_KEY", err)
	}
	if err := connect(natsrt.Config{URL: url("tls"), CA: filepath.Join(c.dir, "missing.pem")}); err == nil || !strings.Contains(err.Error(), "IMAGEPIPE_NATS_CA") {
		t.Errorf("a missing CA file: %v, want a refusal naming IMAGEPIPE_NATS_CA", err)
	}
}

// TestNATSClientRefusesPlaceholderPasswordsBeforeDialling: a function
// configured with a password from the examples does not connect, even to
// a server that would take it, and says which variable to fix.
func TestNATSClientRefusesPlaceholderPasswordsBeforeDialling(t *testing.T) {
	t.Setenv(NATSPasswordVar("ingest"), "change-me-ingest")
	opts, err := LoadNATS(NATSNode{Config: "nats/single.conf", StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	s, err := StartNATS(opts, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Shutdown)
	url, err := ClientURL(opts, "ingest", opts.Port)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := natsrt.Connect(context.Background(), natsrt.Config{URL: url}, "ingest", slog.New(slog.DiscardHandler))
	if err == nil {
		nc.Close()
		t.Fatal("connected with a placeholder password")
	}
	if !errors.Is(err, secrets.ErrPlaceholder) || !strings.Contains(err.Error(), "IMAGEPIPE_NATS_URL") || strings.Contains(err.Error(), "change-me-ingest") {
		t.Errorf("refusal %q: want one naming IMAGEPIPE_NATS_URL, without the password", err)
	}
	if n := s.NumClients(); n != 0 {
		t.Errorf("%d clients reached the server", n)
	}
}
