package infra

import (
	"bufio"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/imagepipe/imagepipe/internal/secrets"
)

// unit is a systemd unit file: section → key → values in order (a key may
// repeat, and an empty assignment resets it as systemd does).
type unit map[string]map[string][]string

func parseUnit(t *testing.T, path string) unit {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	u := unit{}
	section := ""
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = strings.Trim(line, "[]")
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s:%d: not KEY=VALUE in a section: %q", path, n, line)
			}
			k, v = strings.TrimSpace(k), strings.TrimSpace(v)
			if v == "" {
				u[section][k] = []string{""}
				continue
			}
			u[section][k] = append(u[section][k], v)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return u
}

func (u unit) get(section, key string) string {
	v := u[section][key]
	if len(v) == 0 {
		return ""
	}
	return v[len(v)-1]
}

func TestSystemdUnitsAreHardened(t *testing.T) {
	for _, fn := range []string{"ingest", "convert", "notify", "setup"} {
		t.Run(fn, func(t *testing.T) {
			path := "systemd/imagepipe-" + fn + ".service"
			u := parseUnit(t, path)
			svc := u["Service"]
			if svc == nil {
				t.Fatal("no [Service] section")
			}
			want := map[string]string{
				"ProtectSystem":   "strict",
				"PrivateTmp":      "yes",
				"NoNewPrivileges": "yes",
				"ProtectHome":     "yes",
				"PrivateDevices":  "yes",
				"Restart":         "on-failure",
				"EnvironmentFile": "/etc/imagepipe/" + fn + ".env",
				"ExecStart":       "/usr/local/bin/imagepipe " + fn,
			}
			for k, v := range want {
				if got := u.get("Service", k); got != v {
					t.Errorf("%s=%q, want %q", k, got, v)
				}
			}
			if u.get("Service", "DynamicUser") != "yes" && u.get("Service", "User") == "" {
				t.Error("runs as root: set DynamicUser=yes or a dedicated User=")
			}
			if u.get("Service", "MemoryMax") == "" {
				t.Error("no MemoryMax")
			}
			if caps, ok := svc["CapabilityBoundingSet"]; !ok || u.get("Service", "CapabilityBoundingSet") != "" || len(caps) != 1 {
				t.Errorf("CapabilityBoundingSet=%q: want it emptied", caps)
			}

			rw := svc["ReadWritePaths"]
			if fn != "convert" {
				if len(rw) != 0 || svc["StateDirectory"] != nil || svc["CacheDirectory"] != nil {
					t.Errorf("%s writes no files, yet has writable paths %v", fn, rw)
				}
				return
			}
			// convert: scratch, and scratch only.
			env := readEnvFile(t, "systemd/convert.env")
			scratch := env["IMAGEPIPE_SCRATCH_DIR"]
			cache := "/var/cache/" + u.get("Service", "CacheDirectory")
			if len(rw) != 1 || rw[0] != scratch || scratch != cache {
				t.Errorf("ReadWritePaths %v, IMAGEPIPE_SCRATCH_DIR %q, CacheDirectory %q: want the scratch dir as the one writable path", rw, scratch, cache)
			}
			if u.get("Service", "KillMode") != "mixed" {
				t.Error("KillMode is not mixed: a stop would kill qemu-img before convert drains")
			}
		})
	}
}

func TestSystemdEnvFilesWireEachFunctionToItsOwnUsers(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	natsUser := map[string]string{"ingest": "ingest", "convert": "convert", "notify": "notify", "setup": "admin"}
	for fn, user := range natsUser {
		t.Run(fn, func(t *testing.T) {
			env := readEnvFile(t, filepath.Join("systemd", fn+".env"))
			for k := range env {
				if strings.HasPrefix(k, "IMAGEPIPE_") && !strings.Contains(string(readme), "`"+k+"`") {
					t.Errorf("%s is not documented in README.md", k)
				}
			}
			// The files are templates to edit: their passwords are the
			// placeholders the functions refuse to start with.
			checkNATSURL(t, env["IMAGEPIPE_NATS_URL"], user, []string{"nats-1:4222", "nats-2:4222", "nats-3:4222"}, secrets.IsPlaceholder)
			for k, v := range env {
				if (strings.Contains(k, "SECRET") || strings.Contains(k, "PASSWORD")) && !secrets.IsPlaceholder(v) {
					t.Errorf("%s is not a placeholder the functions refuse", k)
				}
			}
			if env["IMAGEPIPE_STREAM_REPLICAS"] != "3" {
				t.Errorf("IMAGEPIPE_STREAM_REPLICAS=%q, want 3 on a 3-node cluster", env["IMAGEPIPE_STREAM_REPLICAS"])
			}
			_, hasS3 := env["IMAGEPIPE_S3_ACCESS_KEY"]
			if hasS3 == (fn == "notify") {
				t.Errorf("S3 credentials present: %v; notify needs none, the others do", hasS3)
			}
		})
	}
}

// checkNATSURL checks a comma-separated IMAGEPIPE_NATS_URL: every node
// once, each as user with a password passwordOK accepts.
func checkNATSURL(t *testing.T, list string, user string, nodes []string, passwordOK func(string) bool) {
	t.Helper()
	var hosts []string
	for _, s := range strings.Split(list, ",") {
		u, err := url.Parse(strings.TrimSpace(s))
		if err != nil {
			t.Errorf("IMAGEPIPE_NATS_URL: %v", err)
			continue
		}
		got, _ := u.User.Password()
		if u.Scheme != "nats" || u.User.Username() != user || !passwordOK(got) {
			t.Errorf("IMAGEPIPE_NATS_URL entry %s: want nats://%s:<its password>@host:port", u.Redacted(), user)
		}
		hosts = append(hosts, u.Host)
	}
	slices.Sort(hosts)
	if !slices.Equal(hosts, nodes) {
		t.Errorf("IMAGEPIPE_NATS_URL lists %v, want every node %v", hosts, nodes)
	}
}

// TestSystemdAcceptsTheUnits runs systemd's own checker where it is
// installed; an unknown key or a bad value is an error there.
func TestSystemdAcceptsTheUnits(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed")
	}
	files, _ := filepath.Glob("systemd/*.service")
	if len(files) < 4 {
		t.Fatalf("unit files: %v", files)
	}
	dir := t.TempDir()
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		// The binary is not installed here; the checker insists it exists.
		b = []byte(strings.ReplaceAll(string(b), "/usr/local/bin/imagepipe", "/bin/true"))
		copyPath := filepath.Join(dir, filepath.Base(f))
		if err := os.WriteFile(copyPath, b, 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(analyze, "verify", "--man=no", copyPath).CombinedOutput()
		if err != nil || len(strings.TrimSpace(string(out))) > 0 {
			t.Errorf("systemd-analyze verify %s: %v\n%s", f, err, out)
		}
	}
}
