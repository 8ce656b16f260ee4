package main

import (
	"context"
	"encoding/json"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"
)

// refusalBound is how long a refusal may take: it comes before any
// connection attempt, so it is as quick as parsing. Read it before
// cleanConfig, which clears IMAGEPIPE_TEST_SCALE with the rest.
func refusalBound() time.Duration { return scaled(time.Second) }

// offline is where every connection setting points in these tests: an
// address that accepts connections, never answers and counts them. No
// server runs there, so a command that tried to connect shows in the
// count and, left waiting for an answer, overruns bound as well.
type offline struct {
	addr  string
	bound time.Duration
	mu    sync.Mutex
	conns []net.Conn
}

// noServers points NATS and S3 where nothing answers and leaves the
// metrics address unset, with static S3 keys so that no credential chain
// asks an instance metadata service either. The connect timeout is twice
// bound, so a refusal that waited for a connection would overrun bound
// even if the count missed it.
func noServers(t *testing.T, bound time.Duration) *offline {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	o := &offline{addr: l.Addr().String(), bound: bound}
	accepting := make(chan struct{})
	go func() {
		defer close(accepting)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			o.mu.Lock()
			o.conns = append(o.conns, c)
			o.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		<-accepting
		o.mu.Lock()
		defer o.mu.Unlock()
		for _, c := range o.conns {
			c.Close()
		}
	})
	t.Setenv("IMAGEPIPE_NATS_URL", "nats://"+o.addr)
	t.Setenv("IMAGEPIPE_S3_ENDPOINT", o.addr)
	t.Setenv("IMAGEPIPE_S3_ACCESS_KEY", "imagepipe-test")
	t.Setenv("IMAGEPIPE_S3_SECRET_KEY", "9c4b1e77d2")
	t.Setenv("IMAGEPIPE_CONNECT_TIMEOUT", (2 * bound).String())
	t.Setenv("IMAGEPIPE_METRICS_ADDR", "")
	return o
}

func (o *offline) accepted() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.conns)
}

// answeredOffline fails the test if what ran since before, for took,
// connected or took longer than a refusal may.
func (o *offline) answeredOffline(t *testing.T, what string, before int, took time.Duration) {
	t.Helper()
	if n := o.accepted() - before; n > 0 {
		t.Errorf("%s connected %d time(s); it must answer before any connection attempt", what, n)
	}
	if took > o.bound {
		t.Errorf("%s took %s, more than %s: it must answer before any connection attempt", what, took.Round(time.Millisecond), o.bound)
	}
}

// cliCase is one command line and what it must give: exit code, and a
// text on the stream that must have output (the other must be empty).
type cliCase struct {
	args   []string
	code   int
	stdout string // wanted on stdout; "" wants stderr to hold stderr
	stderr string
}

// check runs the command line against o, where no server answers: every
// case here is answered from the command line and the environment alone.
func (tc cliCase) check(t *testing.T, o *offline) {
	t.Helper()
	before, start := o.accepted(), time.Now()
	r := imagepipe(t, tc.args...)
	o.answeredOffline(t, "imagepipe "+strings.Join(tc.args, " "), before, time.Since(start))
	if r.code != tc.code {
		t.Errorf("imagepipe %q exited %d, want %d\nstdout: %s\nstderr: %s", tc.args, r.code, tc.code, r.stdout, r.stderr)
	}
	switch {
	case tc.stdout != "":
		if !strings.Contains(r.stdout, tc.stdout) || r.stderr != "" {
			t.Errorf("imagepipe %q: want %q on stdout and nothing on stderr\nstdout: %s\nstderr: %s", tc.args, tc.stdout, r.stdout, r.stderr)
		}
	default:
		if !strings.Contains(r.stderr, tc.stderr) || r.stdout != "" {
			t.Errorf("imagepipe %q: want %q on stderr and nothing on stdout\nstdout: %s\nstderr: %s", tc.args, tc.stderr, r.stdout, r.stderr)
		}
		if !strings.HasPrefix(r.stderr, "imagepipe: ") || strings.Count(r.stderr, "\n") != 1 {
			t.Errorf("imagepipe %q: want one line on stderr starting \"imagepipe: \", got %q", tc.args, r.stderr)
		}
	}
}

// TestCLIRefusesBadValuesBeforeConnecting: a value no server could accept
// is a usage error naming the flag, the value and what is accepted, at
// once, with no server running. "At once" is before any connection
// attempt: one to where nothing answers waits out the connect timeout
// (5s by default; noServers keeps it at twice the bound), where parsing
// takes milliseconds.
func TestCLIRefusesBadValuesBeforeConnecting(t *testing.T) {
	o := noServers(t, refusalBound())
	for _, tc := range []cliCase{
		{args: []string{"reconvert", "uploads/x.vhdx", "--format", "vmdk"}, code: 2, stderr: `--format "vmdk" is not raw or qcow2`},
		{args: []string{"upload", "disk.vhdx", "--format", "vmdk"}, code: 2, stderr: `--format "vmdk" is not raw or qcow2`},
		{args: []string{"import", "notaurl"}, code: 2, stderr: `URL "notaurl" is not a URL; want an http or https URL`},
		{args: []string{"import", "https://example.com/d.qcow2", "--sha256", "abc"}, code: 2, stderr: `--sha256 "abc" is not a SHA-256 digest; want 64 hex digits`},
		{args: []string{"ls", "--state", "nosuch"}, code: 2, stderr: `--state "nosuch" is not a state; want one or more of uploaded, queued`},
		{args: []string{"ls", "--state", "failed,nosuch"}, code: 2, stderr: `--state "nosuch"`},
		{args: []string{"ls", "--limit", "-1"}, code: 2, stderr: `--limit -1 is negative`},
		{args: []string{"ctl", "status", "--function", "resize"}, code: 2, stderr: `--function "resize" is not a function; want one of ingest, convert, notify`},
		{args: []string{"ctl", "frobnicate"}, code: 2, stderr: `unknown verb "frobnicate"`},
		{args: []string{"ctl"}, code: 2, stderr: "ctl needs a verb"},
		{args: []string{"dedup"}, code: 2, stderr: "dedup needs a subcommand: prune"},
		{args: []string{"dedup", "prune", "--older-than", "soon"}, code: 2, stderr: `invalid argument "soon" for "--older-than"`},
		{args: []string{"status", "notanobject"}, code: 2, stderr: `"notanobject" is not BUCKET/KEY`},
		{args: []string{"status", "uploads/x.vhdx", "--timeout", "1m"}, code: 2, stderr: "--timeout needs --wait"},
		{args: []string{"status", "uploads/x.vhdx", "--job", "abc"}, code: 2, stderr: "takes no BUCKET/KEY with --job"},
		{args: []string{"reconcile", "--stale-after", "later"}, code: 2, stderr: `--stale-after (IMAGEPIPE_RECONCILE_STALE_AFTER) "later"`},
		{args: []string{"healthcheck"}, code: 2, stderr: "IMAGEPIPE_METRICS_ADDR is not set"},
		{args: []string{"healthcheck", "--url", "ftp://x/readyz"}, code: 2, stderr: `--url "ftp://x/readyz" is not an http or https URL`},
		{args: []string{"frobnicate"}, code: 2, stderr: `unknown command "frobnicate" for "imagepipe"`},
		{args: []string{"stauts", "uploads/x.vhdx"}, code: 2, stderr: `unknown command "stauts" for "imagepipe"; did you mean status?`},
		{args: []string{"--bogus"}, code: 2, stderr: "imagepipe: unknown flag: --bogus (see imagepipe --help)"},
	} {
		tc.check(t, o)
	}
}

// TestFunctionsRefuseEveryBadSettingBeforeConnecting runs each function
// the way main does with one IMAGEPIPE_* variable bad: it exits 1 naming
// the variable, with no server running, before any connection attempt.
// Past its settings a function would retry NATS until ctx ends, so one
// that got that far overruns the bound instead of hanging the test. It is
// not among the TestCLI tests the portable build runs: there the
// functions refuse to start at all (TestFunctionsAndDevRefuseToStartOffLinux…).
func TestFunctionsRefuseEveryBadSettingBeforeConnecting(t *testing.T) {
	bound := refusalBound()
	for _, tt := range badSettings {
		t.Run(tt.name, func(t *testing.T) {
			cleanConfig(t)
			o := noServers(t, bound)
			for k, v := range tt.with {
				t.Setenv(k, v)
			}
			t.Setenv(tt.name, tt.value)
			ctx, cancel := context.WithTimeout(context.Background(), 2*bound)
			defer cancel()
			var out, errb lockedBuffer
			e := &cliEnv{stdout: &out, stderr: &errb, log: slog.New(slog.NewTextHandler(&errb, nil)), jobCtx: ctx}
			before, start := o.accepted(), time.Now()
			code := execute(ctx, e, []string{tt.function})
			what := tt.name + "=" + tt.value + " imagepipe " + tt.function
			o.answeredOffline(t, what, before, time.Since(start))
			if code != 1 || !strings.Contains(errb.String(), tt.name) || out.String() != "" {
				t.Errorf("%s: exit %d, want 1 with %s named on stderr\nstdout: %s\nstderr: %s", what, code, tt.name, out.String(), errb.String())
			}
			if tt.secret && strings.Contains(errb.String(), tt.value) {
				t.Errorf("%s: the secret value is shown:\n%s", what, errb.String())
			}
		})
	}
}

func TestCLIBareCommandPrintsUsageOnStderrAndExits2(t *testing.T) {
	r := imagepipe(t)
	if r.code != 2 || r.stdout != "" || !strings.Contains(r.stderr, "Usage:") || !strings.Contains(r.stderr, "status") {
		t.Errorf("bare imagepipe: exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
	}
}

func TestCLIHelpListsEveryCommandAndExitCodes(t *testing.T) {
	r := imagepipe(t, "--help")
	if r.code != 0 || r.stderr != "" {
		t.Fatalf("--help: exit %d, stderr %s", r.code, r.stderr)
	}
	for _, want := range []string{"dev", "setup", "ingest", "convert", "notify", "healthcheck", "upload", "status", "watch", "ls",
		"inspect", "import", "ctl", "reconvert", "reconcile", "dedup", "completion", "version", "2 usage error"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("imagepipe --help does not mention %q:\n%s", want, r.stdout)
		}
	}
}

func TestCLIVersionPrintsBuildInformation(t *testing.T) {
	r := imagepipe(t, "version", "--json")
	var b buildInfo
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &b) != nil {
		t.Fatalf("version --json: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	if b.Version != version || !strings.HasPrefix(b.Go, "go") || b.Platform == "" {
		t.Errorf("version --json = %+v", b)
	}
	for _, args := range [][]string{{"version"}, {"--version"}} {
		if r := imagepipe(t, args...); r.code != 0 || !strings.HasPrefix(r.stdout, "imagepipe "+version+"\n") {
			t.Errorf("%v: exit %d, %q", args, r.code, r.stdout)
		}
	}
}

func TestCLICompletionScriptsForEveryShell(t *testing.T) {
	for _, shell := range []string{"bash", "zsh", "fish", "powershell"} {
		r := imagepipe(t, "completion", shell)
		if r.code != 0 || !strings.Contains(r.stdout, "imagepipe") || r.stderr != "" {
			t.Errorf("completion %s: exit %d, %d bytes, stderr %s", shell, r.code, len(r.stdout), r.stderr)
		}
	}
	// Cobra's hidden completion request lists the commands.
	r := imagepipe(t, "__complete", "s")
	if r.code != 0 || !strings.Contains(r.stdout, "status") || !strings.Contains(r.stdout, "setup") {
		t.Errorf("__complete s: exit %d, %q", r.code, r.stdout)
	}
}
