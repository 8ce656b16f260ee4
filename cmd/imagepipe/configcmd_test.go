package main

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// cleanConfig sets a configuration every function accepts, pointing at
// servers that do not exist: none of these tests may connect anywhere.
func cleanConfig(t *testing.T) {
	t.Helper()
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "IMAGEPIPE_") {
			t.Setenv(k, "")
			os.Unsetenv(k)
		}
	}
	t.Setenv("IMAGEPIPE_NATS_URL", "nats://127.0.0.1:"+strconv.Itoa(closedPort(t)))
	t.Setenv("IMAGEPIPE_S3_ENDPOINT", "127.0.0.1:"+strconv.Itoa(closedPort(t)))
	t.Setenv("IMAGEPIPE_S3_ACCESS_KEY", "imagepipe-test")
	t.Setenv("IMAGEPIPE_S3_SECRET_KEY", "9c4b1e77d2")
}

func closedPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// badSetting is one variable set to a value no function accepts.
type badSetting struct {
	name, value string
	function    string            // whose check must refuse it
	secret      bool              // the value must not appear in the error
	with        map[string]string // what else it needs to be looked at
}

var smtpOn = map[string]string{"IMAGEPIPE_SMTP_ADDR": "smtp.example.com", "IMAGEPIPE_SMTP_FROM": "imagepipe@example.com", "IMAGEPIPE_SMTP_TO": "ops@example.com"}

var badSettings = []badSetting{
	{name: "IMAGEPIPE_LOG_LEVEL", value: "verbose", function: "notify"},
	{name: "IMAGEPIPE_LOG_FORMAT", value: "yaml", function: "notify"},
	{name: "IMAGEPIPE_NATS_URL", value: "http://nats:4222", function: "notify"},
	{name: "IMAGEPIPE_NATS_CREDS", value: "/nonexistent/imagepipe.creds", function: "notify"},
	{name: "IMAGEPIPE_NATS_PASSWORD_FILE", value: "/nonexistent/nats-password", function: "notify"},
	{name: "IMAGEPIPE_NATS_NKEY", value: "/nonexistent/user.nk", function: "notify"},
	{name: "IMAGEPIPE_NATS_CA", value: "/nonexistent/ca.pem", function: "notify"},
	{name: "IMAGEPIPE_NATS_CERT", value: "/nonexistent/cert.pem", function: "notify", with: map[string]string{"IMAGEPIPE_NATS_KEY": "/etc/hostname"}},
	{name: "IMAGEPIPE_NATS_KEY", value: "/nonexistent/key.pem", function: "notify", with: map[string]string{"IMAGEPIPE_NATS_CERT": "/etc/hostname"}},
	{name: "IMAGEPIPE_CONNECT_TIMEOUT", value: "soon", function: "notify"},
	{name: "IMAGEPIPE_S3_ENDPOINT", value: "http://minio:9000", function: "convert"},
	{name: "IMAGEPIPE_S3_SECRET_KEY", value: "change-me-convert-s3", function: "convert", secret: true},
	{name: "IMAGEPIPE_S3_ACCESS_KEY_FILE", value: "/nonexistent/access-key", function: "ingest"},
	{name: "IMAGEPIPE_S3_SECRET_KEY_FILE", value: "/nonexistent/secret-key", function: "ingest"},
	{name: "IMAGEPIPE_S3_SECURE", value: "yes", function: "ingest"},
	{name: "IMAGEPIPE_S3_SESSION_TOKEN_FILE", value: "/nonexistent/session-token", function: "convert"},
	{name: "IMAGEPIPE_S3_ZERO_OBJECT_SIZE", value: "nothing", function: "convert"},
	{name: "IMAGEPIPE_STREAM_REPLICAS", value: "7", function: "notify"},
	{name: "IMAGEPIPE_DEDUP_WINDOW", value: "2 minutes", function: "ingest"},
	{name: "IMAGEPIPE_METRICS_ADDR", value: "9477", function: "convert"},
	{name: "IMAGEPIPE_INPUT_BUCKET", value: "Uploads_1", function: "ingest"},
	{name: "IMAGEPIPE_OUTPUT_BUCKET", value: "x", function: "convert"},
	{name: "IMAGEPIPE_OUTPUT_PREFIX", value: "errors/", function: "convert"},
	{name: "IMAGEPIPE_MAX_INPUT_SIZE", value: "1X", function: "ingest"},
	{name: "IMAGEPIPE_RECONCILE_EVERY", value: "often", function: "ingest"},
	{name: "IMAGEPIPE_RECONCILE_STALE_AFTER", value: "-5m", function: "ingest"},
	{name: "IMAGEPIPE_IMPORT_ALLOWED_PORTS", value: "ssh", function: "ingest"},
	{name: "IMAGEPIPE_IMPORT_DISALLOWED_PORTS", value: "0", function: "ingest"},
	{name: "IMAGEPIPE_IMPORT_ALLOWED_NETWORKS", value: "10.0.0.0", function: "ingest"},
	{name: "IMAGEPIPE_IMPORT_DISALLOWED_NETWORKS", value: "metadata", function: "ingest"},
	{name: "IMAGEPIPE_IMPORT_PROXY", value: "socks5://proxy:1080", function: "ingest"},
	{name: "IMAGEPIPE_IMPORT_MAX_REDIRECTS", value: "-1", function: "ingest"},
	{name: "IMAGEPIPE_IMPORT_TIMEOUT", value: "0s", function: "ingest"},
	{name: "IMAGEPIPE_IMPORT_IDLE_TIMEOUT", value: "a while", function: "ingest"},
	{name: "IMAGEPIPE_IMPORT_MAX_CONCURRENT", value: "0", function: "ingest"},
	{name: "IMAGEPIPE_OUTPUT_FORMAT", value: "vmdk", function: "convert"},
	{name: "IMAGEPIPE_SCRATCH_DIR", value: "/nonexistent/scratch", function: "convert"},
	{name: "IMAGEPIPE_MAX_CONCURRENT_JOBS", value: "0", function: "convert"},
	{name: "IMAGEPIPE_MAX_VIRTUAL_SIZE", value: "lots", function: "convert"},
	{name: "IMAGEPIPE_CONVERT_TIMEOUT_BASE", value: "0s", function: "convert"},
	{name: "IMAGEPIPE_CONVERT_TIMEOUT_PER_GIB", value: "-1m", function: "convert"},
	{name: "IMAGEPIPE_MAX_ATTEMPTS", value: "0", function: "convert"},
	{name: "IMAGEPIPE_RETRY_BACKOFF", value: "soon", function: "ingest"},
	{name: "IMAGEPIPE_ACK_WAIT", value: "0s", function: "convert"},
	{name: "IMAGEPIPE_STREAM_OUTPUT", value: "maybe", function: "convert"},
	{name: "IMAGEPIPE_DEDUP", value: "maybe", function: "convert"},
	{name: "IMAGEPIPE_DEDUP_HASH", value: "md5", function: "convert"},
	{name: "IMAGEPIPE_DEDUP_MAX_AGE", value: "-1d", function: "convert"},
	{name: "IMAGEPIPE_OVA_MAX_MEMBERS", value: "0", function: "convert"},
	{name: "IMAGEPIPE_OVA_MAX_DISKS", value: "-2", function: "convert"},
	{name: "IMAGEPIPE_SCRATCH_RESERVE", value: "1Q", function: "convert"},
	{name: "IMAGEPIPE_NOTIFY_ON", value: "everything", function: "notify"},
	{name: "IMAGEPIPE_SLACK_WEBHOOK_URL", value: "hooks.slack.com/services/T0/B0/secretpath", function: "notify", secret: true},
	{name: "IMAGEPIPE_SLACK_WEBHOOK_URL_FILE", value: "/nonexistent/slack-webhook", function: "notify"},
	{name: "IMAGEPIPE_SLACK_TOKEN", value: "xoxb-secret-token", function: "notify", secret: true},
	{name: "IMAGEPIPE_SLACK_TOKEN_FILE", value: "/nonexistent/slack-token", function: "notify"},
	{name: "IMAGEPIPE_SLACK_CHANNEL", value: "#ops", function: "notify"},
	{name: "IMAGEPIPE_SLACK_API_URL", value: "ftp://slack.example.com/api/", function: "notify"},
	{name: "IMAGEPIPE_SLACK_ON", value: "all", function: "notify"},
	{name: "IMAGEPIPE_DISCORD_WEBHOOK_URL", value: "discord-secretpath", function: "notify", secret: true},
	{name: "IMAGEPIPE_DISCORD_WEBHOOK_URL_FILE", value: "/nonexistent/discord", function: "notify"},
	{name: "IMAGEPIPE_DISCORD_ON", value: "errors", function: "notify"},
	{name: "IMAGEPIPE_WEBHOOK_URL", value: "webhook-secretpath", function: "notify", secret: true},
	{name: "IMAGEPIPE_WEBHOOK_URL_FILE", value: "/nonexistent/webhook-url", function: "notify"},
	{name: "IMAGEPIPE_WEBHOOK_SECRET", value: "change-me-webhook", function: "notify", secret: true},
	{name: "IMAGEPIPE_WEBHOOK_SECRET_FILE", value: "/nonexistent/webhook-secret", function: "notify"},
	{name: "IMAGEPIPE_WEBHOOK_ON", value: "success,sometimes", function: "notify"},
	{name: "IMAGEPIPE_SMTP_ADDR", value: "smtp.example.com:99999", function: "notify", with: smtpOn},
	{name: "IMAGEPIPE_SMTP_PASSWORD", value: "password", function: "notify", secret: true},
	{name: "IMAGEPIPE_SMTP_PASSWORD_FILE", value: "/nonexistent/smtp-password", function: "notify"},
	{name: "IMAGEPIPE_SMTP_FROM", value: "imagepipe at example", function: "notify", with: smtpOn},
	{name: "IMAGEPIPE_SMTP_TO", value: "ops", function: "notify", with: smtpOn},
	{name: "IMAGEPIPE_SMTP_TLS", value: "ssl", function: "notify"},
	{name: "IMAGEPIPE_EMAIL_ON", value: "failures", function: "notify"},
	{name: "IMAGEPIPE_NOTIFY_TIMEOUT", value: "0s", function: "notify"},
	{name: "IMAGEPIPE_STALL_AFTER", value: "1 hour", function: "notify"},
	{name: "IMAGEPIPE_STALL_CHECK_EVERY", value: "0s", function: "notify"},
}

// freeText are the variables that take any text, so have no bad value: a
// name, a key prefix, a host, a region.
var freeText = map[string]bool{
	"IMAGEPIPE_NATS_USER": true, "IMAGEPIPE_S3_ACCESS_KEY": true, "IMAGEPIPE_S3_REGION": true, "IMAGEPIPE_S3_SESSION_TOKEN": true,
	"IMAGEPIPE_MINIO_NOTIFY_TARGET": true, "IMAGEPIPE_INGEST_PREFIXES": true, "IMAGEPIPE_INGEST_EXCLUDE_PREFIXES": true,
	"IMAGEPIPE_INGEST_EXTENSIONS": true, "IMAGEPIPE_IMPORT_ALLOWED_SCHEMES": true, "IMAGEPIPE_IMPORT_DISALLOWED_SCHEMES": true,
	"IMAGEPIPE_IMPORT_ALLOWED_HOSTS": true, "IMAGEPIPE_IMPORT_DISALLOWED_HOSTS": true, "IMAGEPIPE_SMTP_USERNAME": true,
}

func TestEveryBadSettingIsRefusedNamingItsVariableWithoutConnecting(t *testing.T) {
	for _, tt := range badSettings {
		t.Run(tt.name, func(t *testing.T) {
			cleanConfig(t)
			for k, v := range tt.with {
				t.Setenv(k, v)
			}
			t.Setenv(tt.name, tt.value)
			var out bytes.Buffer
			err := runConfigCheck(&out, tt.function)
			if err == nil {
				t.Fatalf("%s=%q accepted by config check %s:\n%s", tt.name, tt.value, tt.function, out.String())
			}
			msg := err.Error()
			if !strings.Contains(msg, tt.name) {
				t.Errorf("error does not name %s:\n%s", tt.name, msg)
			}
			if tt.secret && (strings.Contains(msg, tt.value) || strings.Contains(out.String(), tt.value)) {
				t.Errorf("the secret value of %s is shown:\n%s\n%s", tt.name, msg, out.String())
			}
			if !tt.secret && !strings.Contains(msg, tt.value) {
				t.Errorf("error does not show the value %q:\n%s", tt.value, msg)
			}
			if strings.Contains(msg, "parse error on field") || strings.Contains(msg, "connect to NATS") {
				t.Errorf("error names a Go field, or connected:\n%s", msg)
			}
		})
	}
}

func TestEveryVariableHasABadValueInTheTableOrTakesAnyText(t *testing.T) {
	bad := map[string]bool{}
	for _, b := range badSettings {
		bad[b.name] = true
	}
	var s settings
	for _, v := range uniqueVars(s.allParts()) {
		if !bad[v.Name] && !freeText[v.Name] {
			t.Errorf("%s has no bad value in badSettings, nor is it listed as taking any text", v.Name)
		}
	}
}

func TestConfigCheckListsEveryProblemAtOnce(t *testing.T) {
	cleanConfig(t)
	t.Setenv("IMAGEPIPE_OUTPUT_FORMAT", "vmdk")
	t.Setenv("IMAGEPIPE_S3_SECURE", "yes")
	t.Setenv("IMAGEPIPE_NOTIFY_ON", "everything")
	t.Setenv("IMAGEPIPE_LOG_LEVEL", "verbose")
	err := runConfigCheck(io.Discard, "all")
	if err == nil {
		t.Fatal("accepted")
	}
	for _, want := range []string{
		`IMAGEPIPE_OUTPUT_FORMAT="vmdk": want raw or qcow2`,
		`IMAGEPIPE_S3_SECURE="yes": want true or false`,
		`IMAGEPIPE_NOTIFY_ON="everything": want any of success, failure, stalled`,
		`IMAGEPIPE_LOG_LEVEL="verbose": want debug, info, warn or error`,
		"4 problems",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}

func TestConfigCheckChecksOnlyTheNamedFunctionsSettings(t *testing.T) {
	cleanConfig(t)
	t.Setenv("IMAGEPIPE_NOTIFY_ON", "everything") // notify's
	t.Setenv("IMAGEPIPE_OUTPUT_FORMAT", "vmdk")   // convert's
	if err := runConfigCheck(io.Discard, "ingest"); err != nil {
		t.Errorf("ingest refused another function's setting: %v", err)
	}
	t.Setenv("IMAGEPIPE_S3_SECURE", "yes") // no S3 for notify
	if err := runConfigCheck(io.Discard, "notify"); err == nil || strings.Contains(err.Error(), "OUTPUT_FORMAT") || strings.Contains(err.Error(), "S3_SECURE") {
		t.Errorf("notify: %v, want IMAGEPIPE_NOTIFY_ON only", err)
	}
	if err := runConfigCheck(io.Discard, "nosuch"); err == nil || !strings.Contains(err.Error(), "ingest, convert, notify or all") {
		t.Errorf("unknown function: %v", err)
	}
}

func TestConfigCheckShowsTheEffectiveConfigurationWithSecretsMasked(t *testing.T) {
	cleanConfig(t)
	secretFile := filepath.Join(t.TempDir(), "webhook-secret")
	if err := os.WriteFile(secretFile, []byte("4f1e9c2b7d0a-from-file\n"), 0o400); err != nil {
		t.Fatal(err)
	}
	t.Setenv("IMAGEPIPE_NATS_URL", "nats://notify:nats-pass-shown-nowhere@127.0.0.1:"+strconv.Itoa(closedPort(t)))
	t.Setenv("IMAGEPIPE_WEBHOOK_URL", "https://hooks.example.com/secret-path-shown-nowhere")
	t.Setenv("IMAGEPIPE_WEBHOOK_SECRET_FILE", secretFile)
	t.Setenv("IMAGEPIPE_SMTP_PASSWORD", "smtp-pass-shown-nowhere")
	t.Setenv("IMAGEPIPE_STALL_AFTER", "2h")
	t.Setenv("IMAGEPIPE_TYPO_SETTING", "1")
	var out bytes.Buffer
	if err := runConfigCheck(&out, "notify"); err != nil {
		t.Fatalf("%v\n%s", err, out.String())
	}
	got := out.String()
	for _, hidden := range []string{"nats-pass-shown-nowhere", "secret-path-shown-nowhere", "from-file", "smtp-pass-shown-nowhere"} {
		if strings.Contains(got, hidden) {
			t.Errorf("config check shows a secret (%s):\n%s", hidden, got)
		}
	}
	for _, line := range [][]string{
		{"IMAGEPIPE_STALL_AFTER", "2h", "set"},
		{"IMAGEPIPE_NOTIFY_ON", "failure,stalled", "default"},
		{"IMAGEPIPE_WEBHOOK_URL", "(hidden)", "set"},
		{"IMAGEPIPE_WEBHOOK_SECRET_FILE", secretFile, "set"},
		{"IMAGEPIPE_NATS_URL", "nats://redacted@127.0.0.1:", "set"},
		{"IMAGEPIPE_SLACK_TOKEN", "-", "unset"},
	} {
		if !hasRow(got, line...) {
			t.Errorf("no row %q in:\n%s", line, got)
		}
	}
	if strings.Contains(got, "IMAGEPIPE_OUTPUT_FORMAT") || strings.Contains(got, "IMAGEPIPE_S3_ENDPOINT") {
		t.Errorf("notify's check shows settings notify does not read:\n%s", got)
	}
	if !strings.Contains(got, "IMAGEPIPE_TYPO_SETTING") {
		t.Errorf("an IMAGEPIPE_* variable no function reads goes unmentioned:\n%s", got)
	}
}

// hasRow reports whether a line of out holds each of cells, in order.
func hasRow(out string, cells ...string) bool {
	for _, line := range strings.Split(out, "\n") {
		rest, ok := line, true
		for _, c := range cells {
			i := strings.Index(rest, c)
			if i < 0 {
				ok = false
				break
			}
			rest = rest[i+len(c):]
		}
		if ok {
			return true
		}
	}
	return false
}

func TestFunctionRefusesABadSettingBeforeItConnects(t *testing.T) {
	cleanConfig(t)
	t.Setenv("IMAGEPIPE_OUTPUT_FORMAT", "vmdk")
	t.Setenv("IMAGEPIPE_MAX_VIRTUAL_SIZE", "1G") // units work
	// Were it to connect, it would retry the closed port until this
	// context ends, and say so.
	ctx, cancel := context.WithTimeout(context.Background(), scaled(5*time.Minute))
	defer cancel()
	err := runFunction(ctx, ctx, "convert", slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), `IMAGEPIPE_OUTPUT_FORMAT="vmdk": want raw or qcow2`) {
		t.Fatalf("runFunction = %v, want the output format refused", err)
	}
	if strings.Contains(err.Error(), "MAX_VIRTUAL_SIZE") || ctx.Err() != nil {
		t.Fatalf("runFunction = %v (context %v)", err, ctx.Err())
	}
}

func TestSizesAndDurationsTakeUnitsInEveryFunction(t *testing.T) {
	cleanConfig(t)
	t.Setenv("IMAGEPIPE_MAX_VIRTUAL_SIZE", "1G")
	t.Setenv("IMAGEPIPE_SCRATCH_RESERVE", "512MiB")
	t.Setenv("IMAGEPIPE_MAX_INPUT_SIZE", "2TiB")
	t.Setenv("IMAGEPIPE_RETRY_BACKOFF", "1d")
	t.Setenv("IMAGEPIPE_STALL_AFTER", "2d12h")
	s, err := loadSettings()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name      string
		got, want int64
	}{
		{"IMAGEPIPE_MAX_VIRTUAL_SIZE", s.Convert.MaxVirtualSize, 1e9},
		{"IMAGEPIPE_SCRATCH_RESERVE", s.Convert.ScratchReserve, 512 << 20},
		{"IMAGEPIPE_MAX_INPUT_SIZE", s.Ingest.MaxInputSize, 2 << 40},
		{"IMAGEPIPE_RETRY_BACKOFF", int64(s.Convert.RetryBackoff), int64(24 * time.Hour)},
		{"IMAGEPIPE_STALL_AFTER", int64(s.Notify.StallAfter), int64(60 * time.Hour)},
	} {
		if c.got != c.want {
			t.Errorf("%s = %d, want %d", c.name, c.got, c.want)
		}
	}
	// config check spells out which G it took.
	os.Unsetenv("IMAGEPIPE_MAX_INPUT_SIZE") // restored by t.Setenv's cleanup
	var out bytes.Buffer
	if err := runConfigCheck(&out, "all"); err != nil {
		t.Fatal(err)
	}
	if !hasRow(out.String(), "IMAGEPIPE_MAX_VIRTUAL_SIZE", "1G (1000000000 bytes)", "set") ||
		!hasRow(out.String(), "IMAGEPIPE_MAX_INPUT_SIZE", "1099511627776 (1TiB)", "default") {
		t.Errorf("sizes not spelled out:\n%s", out.String())
	}
}

func TestParseLogLevelRefusesWhatItDoesNotKnow(t *testing.T) {
	for in, want := range map[string]slog.Level{"": slog.LevelInfo, "debug": slog.LevelDebug, "INFO": slog.LevelInfo, "warn": slog.LevelWarn, "error": slog.LevelError} {
		if got, err := parseLogLevel(in); err != nil || got != want {
			t.Errorf("parseLogLevel(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := parseLogLevel("verbose"); err == nil || !strings.Contains(err.Error(), `IMAGEPIPE_LOG_LEVEL="verbose"`) {
		t.Errorf("parseLogLevel(verbose) = %v", err)
	}
}
