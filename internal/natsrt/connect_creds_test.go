package natsrt_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/imagepipe/imagepipe/internal/natsrt"
	"github.com/imagepipe/imagepipe/internal/natstest"
	"github.com/imagepipe/imagepipe/test/stack"
)

// operatorServer is a server in operator mode, as nsc sets one up: it
// trusts one operator, and its memory resolver knows one account that
// operator signed. It returns the server and the account's key, which
// signs the account's users.
func operatorServer(t *testing.T) (*server.Server, nkeys.KeyPair) {
	t.Helper()
	operator := mustKey(t, nkeys.CreateOperator)
	opPub, _ := operator.PublicKey()
	opClaims := jwt.NewOperatorClaims(opPub)
	opClaims.Name = "imagepipe-test"
	// The server trusts the operator's claims as decoded from its JWT,
	// as it would read them from an operator file.
	opJWT, err := opClaims.Encode(operator)
	if err != nil {
		t.Fatal(err)
	}
	trusted, err := jwt.DecodeOperatorClaims(opJWT)
	if err != nil {
		t.Fatal(err)
	}

	account := mustKey(t, nkeys.CreateAccount)
	accPub, _ := account.PublicKey()
	accClaims := jwt.NewAccountClaims(accPub)
	accClaims.Name = "IMAGEPIPE"
	accJWT, err := accClaims.Encode(operator)
	if err != nil {
		t.Fatal(err)
	}
	resolver := &server.MemAccResolver{}
	if err := resolver.Store(accPub, accJWT); err != nil {
		t.Fatal(err)
	}
	s := natstest.StartServer(t, &server.Options{TrustedOperators: []*jwt.OperatorClaims{trusted}, AccountResolver: resolver})
	return s, account
}

func mustKey(t *testing.T, create func() (nkeys.KeyPair, error)) nkeys.KeyPair {
	t.Helper()
	kp, err := create()
	if err != nil {
		t.Fatal(err)
	}
	return kp
}

// credsFile writes a credentials file, as nsc generates one, holding the
// JWT of user signed by account and the nkey seed in seedOf, normally the
// user's own.
func credsFile(t *testing.T, account, user, seedOf nkeys.KeyPair) string {
	t.Helper()
	userPub, _ := user.PublicKey()
	claims := jwt.NewUserClaims(userPub)
	claims.Name = "imagepipe-convert"
	userJWT, err := claims.Encode(account)
	if err != nil {
		t.Fatal(err)
	}
	seed, err := user.Seed()
	if err != nil {
		t.Fatal(err)
	}
	creds, err := jwt.FormatUserConfig(userJWT, seed)
	if err != nil {
		t.Fatal(err)
	}
	// FormatUserConfig refuses a seed that is not the JWT's subject's, so
	// a mismatched one is put in its place afterwards, as a file spliced
	// from two users' would hold.
	wrong, err := seedOf.Seed()
	if err != nil {
		t.Fatal(err)
	}
	creds = bytes.Replace(creds, seed, wrong, 1)
	file := filepath.Join(t.TempDir(), "imagepipe.creds")
	if err := os.WriteFile(file, creds, 0o400); err != nil {
		t.Fatal(err)
	}
	return file
}

func TestNATSCredentialsFileSignsInToAnOperatorModeServer(t *testing.T) {
	s, account := operatorServer(t)
	accPub, _ := account.PublicKey()
	user := mustKey(t, nkeys.CreateUser)
	userPub, _ := user.PublicKey()
	log := slog.New(slog.DiscardHandler)

	cfg := natsrt.Config{URL: s.ClientURL(), Creds: credsFile(t, account, user, user), ConnectTimeout: stack.Scaled(10 * time.Second)}
	nc, err := natsrt.Connect(context.Background(), cfg, "convert", log)
	if err != nil {
		t.Fatalf("connect with the credentials file: %v", err)
	}
	defer nc.Close()
	if err := nc.Flush(); err != nil {
		t.Fatalf("signed in but the connection does not answer: %v", err)
	}
	// The server took the connection as the user of the file, in the
	// account that signed it.
	connz, err := s.Connz(&server.ConnzOptions{Username: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(connz.Conns) != 1 || connz.Conns[0].AuthorizedUser != userPub || connz.Conns[0].Account != accPub {
		var got []string
		for _, c := range connz.Conns {
			got = append(got, c.AuthorizedUser+" in "+c.Account)
		}
		t.Errorf("server sees connections %v, want one of user %s in account %s", got, userPub, accPub)
	}
}

func TestNATSWrongCredentialsFileIsRefusedAtOnce(t *testing.T) {
	s, account := operatorServer(t)
	stranger := mustKey(t, nkeys.CreateAccount) // an account the operator never signed
	user, other := mustKey(t, nkeys.CreateUser), mustKey(t, nkeys.CreateUser)
	for _, tc := range []struct {
		name  string
		creds string
	}{
		{"a user of an account the server does not know", credsFile(t, stranger, user, user)},
		{"the user's JWT with another user's seed", credsFile(t, account, user, other)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// A refusal is final: Connect returns it without waiting out
			// a timeout this long.
			cfg := natsrt.Config{URL: s.ClientURL(), Creds: tc.creds, ConnectTimeout: time.Hour}
			nc, err := natsrt.Connect(context.Background(), cfg, "convert", slog.New(slog.DiscardHandler))
			if err == nil {
				nc.Close()
				t.Fatal("signed in with a wrong credentials file")
			}
			if !errors.Is(err, nats.ErrAuthorization) {
				t.Errorf("error %q, want an authorization violation", err)
			}
			if !strings.Contains(err.Error(), s.ClientURL()) || strings.Contains(err.Error(), "gave up after") {
				t.Errorf("error %q, want the URL it tried and no waiting", err)
			}
		})
	}
}
