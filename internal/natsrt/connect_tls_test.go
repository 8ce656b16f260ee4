package natsrt_test

import (
	"context"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/natstest"
	"github.com/imagepipe/imagepipe/test/stack"
)

// pkiFiles are the PEM files of a throwaway CA, a server certificate it
// signed for loopback, and a client certificate it signed, with their keys.
type pkiFiles struct {
	ca, serverCert, serverKey, clientCert, clientKey string
}

func makePKI(t *testing.T) pkiFiles {
	t.Helper()
	pki := stack.NewPKI(t)
	f := pkiFiles{ca: pki.CA}
	f.serverCert, f.serverKey = pki.Issue(t, "server", x509.ExtKeyUsageServerAuth)
	f.clientCert, f.clientKey = pki.Issue(t, "imagepipe-convert", x509.ExtKeyUsageClientAuth)
	return f
}

func TestNATSClientCertificateSignsInWhereTheServerVerifiesClients(t *testing.T) {
	pki := makePKI(t)
	// tls { cert_file, key_file, ca_file, verify: true }, as a server
	// configuration file would have it.
	tc, err := server.GenTLSConfig(&server.TLSConfigOpts{
		CertFile: pki.serverCert, KeyFile: pki.serverKey, CaFile: pki.ca, Verify: true, Timeout: 2,
	})
	if err != nil {
		t.Fatal(err)
	}
	s := natstest.StartServer(t, &server.Options{TLS: true, TLSVerify: true, TLSConfig: tc, TLSTimeout: 2})
	url := fmt.Sprintf("tls://127.0.0.1:%d", s.Addr().(*net.TCPAddr).Port)
	log := slog.New(slog.DiscardHandler)

	cfg := natsrt.Config{URL: url, CA: pki.ca, Cert: pki.clientCert, Key: pki.clientKey, ConnectTimeout: stack.Scaled(10 * time.Second)}
	nc, err := natsrt.Connect(context.Background(), cfg, "convert", log)
	if err != nil {
		t.Fatalf("connect with the client certificate: %v", err)
	}
	if err := nc.Flush(); err != nil {
		t.Errorf("signed in but the connection does not answer: %v", err)
	}
	if !nc.TLSRequired() {
		t.Errorf("connected to %s without TLS", nc.ConnectedUrlRedacted())
	}
	nc.Close()

	// The CA alone proves who the server is, not who the client is: the
	// server turns the connection down, and the error says where it
	// tried and that TLS is what failed.
	cfg.Cert, cfg.Key, cfg.ConnectTimeout = "", "", time.Second
	nc, err = natsrt.Connect(context.Background(), cfg, "convert", log)
	if err == nil {
		nc.Close()
		t.Fatal("signed in without a client certificate to a server that verifies clients")
	}
	for _, want := range []string{url, "IMAGEPIPE_NATS_URL"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
	// Under TLS 1.3 the client's side of the handshake ends before the
	// server has judged its certificate, so the cause reads either as the
	// server's alert ("remote error: tls: certificate required") or, when
	// the client's first write loses the race with it, as the connection
	// the server closed ("tls error: connection closed by remote after
	// TLS handshake").
	if msg := err.Error(); !strings.Contains(msg, "tls: ") && !strings.Contains(msg, "tls error") {
		t.Errorf("error %q does not say TLS failed", err)
	}
}

// A function without a client certificate, on a server that verifies
// clients, is a settings mistake, not an outage: it gives up rather than
// wait, and says which settings it lacks, whether the server's alert
// reached it or only the connection the server closed (under TLS 1.3,
// which of the two is a race; -count=20 sees both).
func TestNATSServerWantingAClientCertificateIsRefusedAtOnceNamingTheSettings(t *testing.T) {
	pki := makePKI(t)
	tc, err := server.GenTLSConfig(&server.TLSConfigOpts{
		CertFile: pki.serverCert, KeyFile: pki.serverKey, CaFile: pki.ca, Verify: true, Timeout: 2,
	})
	if err != nil {
		t.Fatal(err)
	}
	s := natstest.StartServer(t, &server.Options{TLS: true, TLSVerify: true, TLSConfig: tc, TLSTimeout: 2})
	url := fmt.Sprintf("tls://127.0.0.1:%d", s.Addr().(*net.TCPAddr).Port)
	cfg := natsrt.Config{URL: url, CA: pki.ca, ConnectTimeout: time.Hour}
	refusedAtOnce(t, cfg, url, "client certificate", "IMAGEPIPE_NATS_CERT", "IMAGEPIPE_NATS_KEY")
}

// refusedAtOnce connects as a long-running function does, which waits out
// an outage for as long as it lives, and wants it to give up before the
// test's deadline with an error naming where it tried and each of want.
func refusedAtOnce(t *testing.T, cfg natsrt.Config, url string, want ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(30*time.Second))
	defer cancel()
	nc, err := natsrt.ConnectRetrying(ctx, cfg, "convert", slog.New(slog.DiscardHandler))
	if err == nil {
		nc.Close()
		t.Fatal("connected to a server that should have refused the connection")
	}
	if ctx.Err() != nil {
		t.Fatalf("retried until the test's deadline instead of refusing: %v", err)
	}
	for _, w := range append([]string{url, "IMAGEPIPE_NATS_URL"}, want...) {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q lacks %q", err, w)
		}
	}
}

// A server whose certificate the CA does not vouch for is a settings
// mistake, not an outage: a long-running function, which waits out an
// outage for as long as it lives, gives up at once and says why.
func TestNATSServerCertificateFromAnotherCAIsRefusedAtOnce(t *testing.T) {
	pki, other := makePKI(t), makePKI(t)
	tc, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: pki.serverCert, KeyFile: pki.serverKey, Timeout: 2})
	if err != nil {
		t.Fatal(err)
	}
	s := natstest.StartServer(t, &server.Options{TLS: true, TLSConfig: tc, TLSTimeout: 2})
	url := fmt.Sprintf("tls://127.0.0.1:%d", s.Addr().(*net.TCPAddr).Port)
	cfg := natsrt.Config{URL: url, CA: other.ca, ConnectTimeout: time.Hour}
	refusedAtOnce(t, cfg, url, "certificate")
}
