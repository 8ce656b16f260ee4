package infra

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/freeport"
)

// NATSNode says where a server config from nats/ runs in a test: the same
// file an operator deploys, with its ports and store directory moved to
// loopback and a temporary directory.
type NATSNode struct {
	Config   string // path of the .conf file
	StoreDir string
	Port     int // client port; 0 picks a free one
	// ClusterPort and Routes replace the cluster block's listen port and
	// routes (host:port of every node's cluster port, this one included)
	// when the config has one.
	ClusterPort int
	Routes      []string
}

// NATSUsers are the users of nats/accounts.conf; each one's password is
// the server's environment variable NATSPasswordVar(user).
var NATSUsers = []string{"sys", "admin", "minio", events.FunctionIngest, events.FunctionConvert, events.FunctionNotify, "cli", "operator"}

// NATSPasswordVar is the variable the server configs take user's password
// from.
func NATSPasswordVar(user string) string { return "NATS_" + strings.ToUpper(user) + "_PASSWORD" }

// NATSRouteVars are the route password and the three route URLs of the
// cluster configs.
var NATSRouteVars = []string{"NATS_ROUTE_PASSWORD", "NATS_ROUTE_1", "NATS_ROUTE_2", "NATS_ROUTE_3"}

// SetNATSSecrets gives every secret variable of the server configs that
// the environment leaves unset a fresh random value, as an operator does
// once per deployment, so that a test runs the configs as shipped. The
// route URLs name hosts nats-1..3; LoadNATS replaces them with loopback.
func SetNATSSecrets() error {
	set := func(name, value string) error {
		if _, ok := os.LookupEnv(name); ok {
			return nil
		}
		return os.Setenv(name, value)
	}
	for _, u := range NATSUsers {
		if err := set(NATSPasswordVar(u), randomSecret()); err != nil {
			return err
		}
	}
	if err := set("NATS_ROUTE_PASSWORD", randomSecret()); err != nil {
		return err
	}
	for i := 1; i <= 3; i++ {
		u := url.URL{Scheme: "nats", User: url.UserPassword("route", os.Getenv("NATS_ROUTE_PASSWORD")), Host: fmt.Sprintf("nats-%d:6222", i)}
		if err := set(fmt.Sprintf("NATS_ROUTE_%d", i), u.String()); err != nil {
			return err
		}
	}
	return nil
}

// randomSecret is what `openssl rand -hex 32` makes, with a letter in
// front: the server's config parser reads an all-digit value as a number.
func randomSecret() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // never fails (crypto/rand documents it)
	return "s" + hex.EncodeToString(b)
}

// LoadNATS reads a server config as `nats-server -t -c` does, where a
// warning fails the check too, then points it at the node's ports and
// store directory. Routes keep the config's route credentials. Secrets
// the environment does not set get random values (SetNATSSecrets).
func LoadNATS(n NATSNode) (*server.Options, error) {
	if err := SetNATSSecrets(); err != nil {
		return nil, err
	}
	opts, err := server.ProcessConfigFile(n.Config)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", n.Config, err)
	}
	if n.Port == 0 {
		if n.Port, err = freeport.Pick(); err != nil {
			return nil, err
		}
	}
	opts.Host = "127.0.0.1"
	opts.Port = n.Port
	opts.HTTPPort = 0 // monitoring ports would collide between nodes
	opts.StoreDir = n.StoreDir
	opts.NoSigs = true
	if opts.Cluster.Port != 0 {
		if n.ClusterPort == 0 {
			return nil, fmt.Errorf("%s has a cluster block: a cluster port is required", n.Config)
		}
		opts.Cluster.Host = "127.0.0.1"
		opts.Cluster.Port = n.ClusterPort
		opts.Routes = nil
		for _, r := range n.Routes {
			u := &url.URL{Scheme: "nats", Host: r}
			if opts.Cluster.Username != "" {
				u.User = url.UserPassword(opts.Cluster.Username, opts.Cluster.Password)
			}
			opts.Routes = append(opts.Routes, u)
		}
	}
	return opts, nil
}

// StartNATS starts a server and waits until it takes clients. Its log goes
// to log, which may be nil.
func StartNATS(opts *server.Options, log *ServerLog) (*server.Server, error) {
	s, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("nats server %s: %w", opts.ServerName, err)
	}
	if log != nil {
		s.SetLoggerV2(log, false, false, false)
	}
	go s.Start()
	if !s.ReadyForConnections(20 * time.Second) {
		s.Shutdown()
		return nil, fmt.Errorf("nats server %s: not ready on port %d after 20s", opts.ServerName, opts.Port)
	}
	return s, nil
}

// Password returns the password the config gives user.
func Password(opts *server.Options, user string) (string, error) {
	for _, u := range opts.Users {
		if u.Username == user {
			return u.Password, nil
		}
	}
	return "", fmt.Errorf("no user %q in the server config", user)
}

// ClientURL is a client URL for user on the given ports, with the
// password from the config, in the comma-separated form of
// IMAGEPIPE_NATS_URL.
func ClientURL(opts *server.Options, user string, ports ...int) (string, error) {
	if len(ports) == 0 {
		return "", errors.New("client URL: no ports")
	}
	pw, err := Password(opts, user)
	if err != nil {
		return "", err
	}
	var urls []string
	for _, p := range ports {
		u := url.URL{Scheme: "nats", User: url.UserPassword(user, pw), Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(p))}
		urls = append(urls, u.String())
	}
	return strings.Join(urls, ","), nil
}

// ClusterPorts picks a client port and a route port on loopback for each
// of n nodes, and the routes every node of the cluster lists. They come
// from freeport: a node stopped and started again gets its ports back.
func ClusterPorts(n int) (ports, cports []int, routes []string, err error) {
	for range n {
		p, err := freeport.Pick()
		if err != nil {
			return nil, nil, nil, err
		}
		cp, err := freeport.Pick()
		if err != nil {
			return nil, nil, nil, err
		}
		ports, cports = append(ports, p), append(cports, cp)
		routes = append(routes, "127.0.0.1:"+strconv.Itoa(cp))
	}
	return ports, cports, routes, nil
}

// ServerLog keeps what servers say about refused subjects, so that a test
// whose client hangs on a missing permission can say which one.
type ServerLog struct {
	mu         sync.Mutex
	violations []string
	// repeats counts each violation past its first, by its text without
	// the connection's id: a route or client that keeps retrying is told
	// once, not in thousands of lines that hide a test's failure.
	repeats map[string]int
}

// connID is the id a server gives each connection in its log lines.
var connID = regexp.MustCompile(`\b([crlg]id):\d+`)

// Violations returns the permission violations logged so far, each once,
// with how many times it was seen where that is more than once.
func (l *ServerLog) Violations() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]string, len(l.violations))
	for i, v := range l.violations {
		out[i] = v
		if n := l.repeats[v]; n > 0 {
			out[i] += fmt.Sprintf(" (%d times)", n+1)
		}
	}
	return out
}

func (l *ServerLog) record(format string, v ...any) {
	line := fmt.Sprintf(format, v...)
	if !strings.Contains(line, "Violation") {
		return
	}
	line = connID.ReplaceAllString(line, "$1:*")
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, seen := l.repeats[line]; seen {
		l.repeats[line]++
		return
	}
	if l.repeats == nil {
		l.repeats = make(map[string]int)
	}
	l.repeats[line] = 0
	l.violations = append(l.violations, line)
}

// Errorf records permission violations; servers log them as errors.
func (l *ServerLog) Errorf(format string, v ...any) { l.record(format, v...) }

// Warnf records permission violations too.
func (l *ServerLog) Warnf(format string, v ...any) { l.record(format, v...) }

// Noticef ignores notices.
func (l *ServerLog) Noticef(string, ...any) {}

// Fatalf ignores fatal errors: a server that fails to start says so to
// StartNATS.
func (l *ServerLog) Fatalf(string, ...any) {}

// Debugf ignores debug output.
func (l *ServerLog) Debugf(string, ...any) {}

// Tracef ignores traces.
func (l *ServerLog) Tracef(string, ...any) {}
