package infra

import (
	"context"
	"maps"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caarlos0/env/v11"
	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"

	"github.com/imagepipe/imagepipe/functions/convert"
	"github.com/imagepipe/imagepipe/internal/secrets"
)

// composeSecrets are the variables compose.yaml refuses to start without,
// with the values a test gives them, as `infra/compose/secrets.sh > .env`
// does for an operator.
var composeSecrets = map[string]string{
	"NATS_SYS_PASSWORD": "sys5e1", "NATS_ADMIN_PASSWORD": "admin7c2", "NATS_MINIO_PASSWORD": "minio9d3",
	"NATS_INGEST_PASSWORD": "ingest4a4", "NATS_CONVERT_PASSWORD": "convert8b5", "NATS_NOTIFY_PASSWORD": "notify2f6",
	"NATS_CLI_PASSWORD": "cli6e7", "NATS_OPERATOR_PASSWORD": "operator1a8", "NATS_ROUTE_PASSWORD": "route3c9",
	"MINIO_ROOT_PASSWORD": "root0d0",
	"S3_SETUP_SECRET_KEY": "setup-s3-b1", "S3_INGEST_SECRET_KEY": "ingest-s3-c2", "S3_CONVERT_SECRET_KEY": "convert-s3-d3",
}

func envList(m map[string]string) []string {
	var l []string
	for k, v := range m {
		l = append(l, k+"="+v)
	}
	return l
}

// loadCompose loads compose.yaml as `docker compose` does, env files
// included; there is no Docker engine here to ask. The secrets are set in
// this process's environment too, where the NATS configs read them.
func loadCompose(t *testing.T) *types.Project {
	t.Helper()
	for k, v := range composeSecrets {
		t.Setenv(k, v)
	}
	p, err := loadComposeWith(composeSecrets)
	if err != nil {
		t.Fatalf("compose.yaml: %v", err)
	}
	return p
}

// loadComposeWith loads compose.yaml with env as its only variables.
func loadComposeWith(env map[string]string) (*types.Project, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	opts, err := cli.NewProjectOptions([]string{"../compose.yaml"}, cli.WithWorkingDirectory(".."), cli.WithEnv(envList(env)))
	if err != nil {
		return nil, err
	}
	return opts.LoadProject(ctx)
}

func TestComposePublishesPortsOnLoopbackUnlessAsked(t *testing.T) {
	p := loadCompose(t)
	published := 0
	for name, s := range p.Services {
		for _, port := range s.Ports {
			published++
			if port.HostIP != "127.0.0.1" {
				t.Errorf("%s publishes %s on %q, want 127.0.0.1", name, port.Published, port.HostIP)
			}
		}
	}
	if published < 4 {
		t.Fatalf("%d published ports: NATS, S3, the console and the mail catcher want one each", published)
	}
	// IMAGEPIPE_BIND asks for another address, for every port at once.
	asked := maps.Clone(composeSecrets)
	asked["IMAGEPIPE_BIND"] = "0.0.0.0"
	p, err := loadComposeWith(asked)
	if err != nil {
		t.Fatal(err)
	}
	for name, s := range p.Services {
		for _, port := range s.Ports {
			if port.HostIP != "0.0.0.0" {
				t.Errorf("with IMAGEPIPE_BIND=0.0.0.0, %s publishes %s on %q", name, port.Published, port.HostIP)
			}
		}
	}
}

func TestComposeRefusesToStartWithoutEverySecret(t *testing.T) {
	for name := range composeSecrets {
		env := maps.Clone(composeSecrets)
		delete(env, name)
		_, err := loadComposeWith(env)
		if err == nil || !strings.Contains(err.Error(), name) || !strings.Contains(err.Error(), "secrets.sh") {
			t.Errorf("compose.yaml without %s: %v, want a refusal naming it and how to make one", name, err)
		}
	}
}

// TestComposeShipsNoSecretOnlyVariables: no file compose reads holds a
// secret, and every secret a service gets is one of the variables.
func TestComposeShipsNoSecretOnlyVariables(t *testing.T) {
	files, _ := filepath.Glob("compose/*.env")
	files = append(files, "minio/notify.env", "../compose.yaml")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(b), "change-me") || strings.Contains(string(b), secrets.MinIODefault) {
			t.Errorf("%s ships a placeholder secret", f)
		}
	}
	p := loadCompose(t)
	given := map[string]bool{}
	for _, v := range composeSecrets {
		given[v] = true
	}
	for name, s := range p.Services {
		for k, v := range s.Environment {
			if v == nil {
				continue
			}
			switch {
			case strings.HasSuffix(k, "_NATS_URL") || slices.Contains(NATSRouteVars[1:], k):
				for _, raw := range strings.Split(*v, ",") {
					u, err := url.Parse(raw)
					if err != nil {
						t.Fatalf("%s: %s: %v", name, k, err)
					}
					pw, _ := u.User.Password()
					if !given[pw] {
						t.Errorf("%s: %s holds a password that is none of the variables", name, k)
					}
				}
			case strings.Contains(k, "PASSWORD") || strings.Contains(k, "SECRET"):
				if !given[*v] {
					t.Errorf("%s: %s is none of the variables", name, k)
				}
			}
		}
	}
	if m := p.Services["minio"].Environment["MINIO_NOTIFY_NATS_PASSWORD_PRIMARY"]; m == nil || *m != composeSecrets["NATS_MINIO_PASSWORD"] {
		t.Error("MinIO's notification target does not sign in with NATS_MINIO_PASSWORD")
	}
}

// TestComposeSecretsScriptMakesEveryVariable runs secrets.sh: it prints
// each variable compose asks for, once, with a fresh value compose takes.
func TestComposeSecretsScriptMakesEveryVariable(t *testing.T) {
	out, err := exec.Command("sh", "compose/secrets.sh").Output()
	if err != nil {
		t.Fatalf("secrets.sh: %v", err)
	}
	got := map[string]string{}
	seen := map[string]bool{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		k, v, ok := strings.Cut(line, "=")
		if !ok || len(v) < 33 || seen[v] || secrets.IsPlaceholder(v) {
			t.Errorf("line %q: want NAME=<a fresh random value>", line)
		}
		got[k], seen[v] = v, true
	}
	if !slices.Equal(slices.Sorted(maps.Keys(got)), slices.Sorted(maps.Keys(composeSecrets))) {
		t.Errorf("secrets.sh sets %v, compose asks for %v", slices.Sorted(maps.Keys(got)), slices.Sorted(maps.Keys(composeSecrets)))
	}
	if _, err := loadComposeWith(got); err != nil {
		t.Errorf("compose.yaml with secrets.sh's output: %v", err)
	}
}

var (
	natsNodes     = []string{"nats-1", "nats-2", "nats-3"}
	functions     = []string{"ingest", "convert", "notify"}
	oneShots      = []string{"minio-users", "setup"}
	composeServes = []string{"nats-1", "nats-2", "nats-3", "minio", "minio-users", "setup", "ingest", "convert", "notify", "mailpit"}
)

func TestComposeHasTheClusterAndEveryPart(t *testing.T) {
	p := loadCompose(t)
	var names []string
	for name := range p.Services {
		names = append(names, name)
	}
	slices.Sort(names)
	want := slices.Clone(composeServes)
	slices.Sort(want)
	if !slices.Equal(names, want) {
		t.Errorf("services %v, want %v", names, want)
	}
}

func TestComposePinsEveryImageAndChecksEveryServicesHealth(t *testing.T) {
	p := loadCompose(t)
	for name, s := range p.Services {
		ref, tag, ok := strings.Cut(s.Image, ":")
		if !ok || tag == "" || tag == "latest" || strings.Contains(tag, "/") || ref == "" {
			t.Errorf("%s: image %q is not pinned to a tag", name, s.Image)
		}
		hc := s.HealthCheck
		if slices.Contains(oneShots, name) {
			// Nothing stays up to be healthy; what waits on a one-shot waits
			// for it to exit 0, and it must not come back.
			if hc == nil || !hc.Disable || s.Restart != types.RestartPolicyNo {
				t.Errorf("%s: a one-shot wants its health check disabled and restart \"no\"", name)
			}
			continue
		}
		if hc == nil || hc.Disable || len(hc.Test) < 2 {
			t.Errorf("%s: no health check", name)
		}
	}
}

func TestComposeWiresEveryFunctionToTheWholeCluster(t *testing.T) {
	p := loadCompose(t) // sets the NATS servers' password variables too
	opts, err := LoadNATS(NATSNode{Config: "nats/single.conf", StoreDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	var nodes []string
	for _, n := range natsNodes {
		nodes = append(nodes, n+":4222")
	}
	users := map[string]string{"ingest": "ingest", "convert": "convert", "notify": "notify", "setup": "admin"}
	for svc, user := range users {
		t.Run(svc, func(t *testing.T) {
			s := p.Services[svc]
			if s.Image != p.Services["setup"].Image || s.Build == nil {
				t.Errorf("image %q: every imagepipe service runs the image built here", s.Image)
			}
			// Secrets live in infra files, never inline.
			if len(s.EnvFiles) == 0 {
				t.Fatal("no env_file")
			}
			for _, f := range s.EnvFiles {
				if rel, _ := filepath.Rel(p.WorkingDir, f.Path); !strings.HasPrefix(rel, "infra"+string(filepath.Separator)) {
					t.Errorf("env file %s is not under infra/", f.Path)
				}
			}
			for k := range s.Environment {
				if strings.Contains(k, "SECRET") || strings.Contains(k, "PASSWORD") || k == "IMAGEPIPE_NATS_URL" {
					env := readEnvFile(t, filepath.Join("compose", svc+".env"))
					if _, fromFile := env[k]; !fromFile {
						t.Errorf("%s is set inline, not from infra/compose/%s.env", k, svc)
					}
				}
			}
			url := s.Environment["IMAGEPIPE_NATS_URL"]
			if url == nil {
				t.Fatal("IMAGEPIPE_NATS_URL not set")
			}
			pw, err := Password(opts, user)
			if err != nil {
				t.Fatal(err)
			}
			checkNATSURL(t, *url, user, nodes, func(got string) bool { return got == pw })
			if r := s.Environment["IMAGEPIPE_STREAM_REPLICAS"]; r == nil || *r != "3" {
				t.Errorf("IMAGEPIPE_STREAM_REPLICAS %v, want 3", r)
			}
			if svc == "setup" {
				for _, dep := range append(slices.Clone(natsNodes), "minio") {
					if c := s.DependsOn[dep].Condition; c != types.ServiceConditionHealthy {
						t.Errorf("setup starts on %s %q, want healthy", dep, c)
					}
				}
				return
			}
			if c := s.DependsOn["setup"].Condition; c != types.ServiceConditionCompletedSuccessfully {
				t.Errorf("starts on setup %q, want it completed successfully", c)
			}
			// Back after a reboot: Docker restarts an on-failure container
			// only if it exited non-zero, and a drained function exits 0.
			if s.Restart != types.RestartPolicyUnlessStopped {
				t.Errorf("restart %q, want unless-stopped", s.Restart)
			}
			// imagepipe healthcheck asks /readyz of IMAGEPIPE_METRICS_ADDR,
			// which must then be set; the image has no curl.
			if addr := s.Environment["IMAGEPIPE_METRICS_ADDR"]; addr == nil || *addr == "" {
				t.Error("IMAGEPIPE_METRICS_ADDR not set: imagepipe healthcheck has nothing to ask")
			}
			if want := []string{"CMD", "imagepipe", "healthcheck"}; !slices.Equal(s.HealthCheck.Test, want) {
				t.Errorf("health check %v, want %v", s.HealthCheck.Test, want)
			}
		})
	}
}

func TestComposeRunsTwoConvertReplicasWithScratch(t *testing.T) {
	p := loadCompose(t)
	s := p.Services["convert"]
	if s.Deploy == nil || s.Deploy.Replicas == nil || *s.Deploy.Replicas != 2 {
		t.Errorf("deploy %+v, want 2 replicas", s.Deploy)
	}
	scratch := s.Environment["IMAGEPIPE_SCRATCH_DIR"]
	if scratch == nil {
		t.Fatal("IMAGEPIPE_SCRATCH_DIR not set")
	}
	mounted := false
	for _, v := range s.Volumes {
		if v.Type == types.VolumeTypeVolume && v.Target == *scratch {
			mounted = true
		}
	}
	if !mounted {
		t.Errorf("no volume on the scratch dir %s: %+v", *scratch, s.Volumes)
	}
}

func TestComposeRunsEachNATSNodeFromItsConfig(t *testing.T) {
	p := loadCompose(t)
	for i, name := range natsNodes {
		s := p.Services[name]
		want := "/etc/nats/cluster-" + string(rune('1'+i)) + ".conf"
		if !slices.Contains(s.Command, want) {
			t.Errorf("%s: command %v, want -c %s", name, s.Command, want)
		}
		var confs, data bool
		for _, v := range s.Volumes {
			if v.Type == types.VolumeTypeBind && v.Target == "/etc/nats" && strings.HasSuffix(v.Source, filepath.Join("infra", "nats")) && v.ReadOnly {
				confs = true
			}
			if v.Type == types.VolumeTypeVolume && v.Target == "/data" {
				data = true
			}
		}
		if !confs || !data {
			t.Errorf("%s: volumes %+v, want infra/nats read-only on /etc/nats and a volume on /data", name, s.Volumes)
		}
	}
}

func TestComposeWiresMinIOAndMail(t *testing.T) {
	p := loadCompose(t)
	m := p.Services["minio"]
	env := func(k string) string {
		if v := m.Environment[k]; v != nil {
			return *v
		}
		return ""
	}
	if addr := env("MINIO_NOTIFY_NATS_ADDRESS_PRIMARY"); !slices.Contains(natsNodes, strings.TrimSuffix(addr, ":4222")) {
		t.Errorf("MinIO publishes to %q, not a cluster node", addr)
	}
	if env("MINIO_NOTIFY_NATS_USERNAME_PRIMARY") != "minio" {
		t.Error("MinIO does not sign in to NATS as the minio user")
	}
	queue := env("MINIO_NOTIFY_NATS_QUEUE_DIR_PRIMARY")
	onVolume := false
	for _, v := range m.Volumes {
		if v.Type == types.VolumeTypeVolume && v.Target == queue {
			onVolume = true
		}
	}
	if !onVolume {
		t.Errorf("notification queue %q is not on a volume of its own: queued events would die with the container", queue)
	}
	if env("MINIO_ROOT_PASSWORD") != composeSecrets["MINIO_ROOT_PASSWORD"] {
		t.Error("the root password is not MINIO_ROOT_PASSWORD")
	}

	n := p.Services["notify"]
	if smtp := n.Environment["IMAGEPIPE_SMTP_ADDR"]; smtp == nil || *smtp != "mailpit:1025" {
		t.Errorf("notify mails to %v, want the mail catcher", smtp)
	}
	if c := n.DependsOn["mailpit"].Condition; c != types.ServiceConditionHealthy {
		t.Errorf("notify starts on mailpit %q", c)
	}
}

// TestComposeMinIOUsersMatchTheFunctionsKeys runs create-users.sh with a
// stand-in mc that records its calls: each function's user gets its own
// policy file and the keys from its own env file.
func TestComposeMinIOUsersMatchTheFunctionsKeys(t *testing.T) {
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh")
	}
	p := loadCompose(t) // and the secrets' variables, which the script reads
	bin := t.TempDir()
	calls := filepath.Join(bin, "calls")
	fake := "#!/bin/sh\necho \"$*\" >> " + calls + "\n"
	if err := os.WriteFile(filepath.Join(bin, "mc"), []byte(fake), 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(sh, "minio/create-users.sh", "compose", "minio/iam")
	cmd.Env = append(os.Environ(), "PATH="+bin+":"+os.Getenv("PATH"), "MINIO_ROOT_USER=root", "MINIO_ROOT_PASSWORD=rootsecret")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("create-users.sh: %v\n%s", err, out)
	}
	got, err := os.ReadFile(calls)
	if err != nil {
		t.Fatal(err)
	}
	for _, fn := range []string{"setup", "ingest", "convert"} {
		env := p.Services[fn].Environment
		access, secret := *env["IMAGEPIPE_S3_ACCESS_KEY"], *env["IMAGEPIPE_S3_SECRET_KEY"]
		for _, want := range []string{
			"admin policy create imagepipe imagepipe-" + fn + " minio/iam/" + fn + ".json",
			"admin user add imagepipe " + access + " " + secret,
			"admin policy attach imagepipe imagepipe-" + fn + " --user " + access,
		} {
			if !strings.Contains(string(got), want+"\n") {
				t.Errorf("mc was not asked to %q; calls:\n%s", want, got)
			}
		}
	}
	if _, hasS3 := p.Services["notify"].Environment["IMAGEPIPE_S3_ACCESS_KEY"]; hasS3 {
		t.Error("notify has S3 credentials it does not need")
	}
}

// systemdBytes reads a systemd size such as 512M or 4G (powers of 1024).
func systemdBytes(t *testing.T, v string) int64 {
	t.Helper()
	mult := map[string]int64{"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
	n, err := strconv.ParseInt(strings.TrimRight(v, "KMGT"), 10, 64)
	m, ok := mult[v[len(v)-1:]]
	if err != nil || !ok {
		t.Fatalf("size %q: want a number and K, M, G or T", v)
	}
	return n * m
}

// systemdDuration reads a systemd time span such as 30min or 2min.
func systemdDuration(t *testing.T, v string) time.Duration {
	t.Helper()
	d, err := time.ParseDuration(strings.ReplaceAll(v, "min", "m"))
	if err != nil {
		t.Fatalf("time span %q: %v", v, err)
	}
	return d
}

// TestComposeSandboxesEachImagepipeServiceAsItsSystemdUnit: the containers
// get what the units of infra/systemd get: a read-only system with a
// private /tmp, the scratch volume as convert's only other writable path,
// no capabilities, no privileges to gain, and the same memory cap.
func TestComposeSandboxesEachImagepipeServiceAsItsSystemdUnit(t *testing.T) {
	p := loadCompose(t)
	for _, name := range append(slices.Clone(functions), "setup") {
		t.Run(name, func(t *testing.T) {
			s := p.Services[name]
			u := parseUnit(t, "systemd/imagepipe-"+name+".service")
			if !s.ReadOnly {
				t.Error("root file system is writable: want read_only: true")
			}
			if !slices.Contains(s.CapDrop, "ALL") || len(s.CapAdd) != 0 {
				t.Errorf("cap_drop %v, cap_add %v: want every capability dropped", s.CapDrop, s.CapAdd)
			}
			if !slices.Contains(s.SecurityOpt, "no-new-privileges:true") {
				t.Errorf("security_opt %v: want no-new-privileges:true", s.SecurityOpt)
			}
			if want := systemdBytes(t, u.get("Service", "MemoryMax")); int64(s.MemLimit) != want {
				t.Errorf("mem_limit %d bytes, want the unit's MemoryMax, %d", s.MemLimit, want)
			}
			if name == "setup" {
				return
			}
			if len(s.Tmpfs) != 1 || !strings.HasPrefix(s.Tmpfs[0], "/tmp:") || !strings.Contains(s.Tmpfs[0], "size=") {
				t.Errorf("tmpfs %v: want a private /tmp of a bounded size, as PrivateTmp=yes", s.Tmpfs)
			}
			var writable []string
			for _, v := range s.Volumes {
				if !v.ReadOnly {
					writable = append(writable, v.Target)
				}
			}
			want := []string{}
			if name == "convert" {
				want = []string{*s.Environment["IMAGEPIPE_SCRATCH_DIR"]}
			}
			if !slices.Equal(writable, want) && !(len(writable) == 0 && len(want) == 0) {
				t.Errorf("writable mounts %v, want %v", writable, want)
			}
		})
	}
}

// TestComposeLetsEachFunctionDrainBeforeItIsKilled: `docker compose stop`
// and a restart send SIGTERM, which drains; the grace period is the
// systemd unit's TimeoutStopSec, and convert's covers a conversion of a
// 25 GiB disk at the default time limit of qemu-img, far more than the
// AckWait after which a job cut short goes to another replica.
func TestComposeLetsEachFunctionDrainBeforeItIsKilled(t *testing.T) {
	p := loadCompose(t)
	var cfg convert.Config
	if err := env.ParseWithOptions(&cfg, env.Options{Environment: map[string]string{}}); err != nil {
		t.Fatal(err)
	}
	for _, name := range functions {
		s := p.Services[name]
		if s.StopGracePeriod == nil {
			t.Errorf("%s: no stop_grace_period: Docker kills it 10s after SIGTERM, mid-job", name)
			continue
		}
		grace := time.Duration(*s.StopGracePeriod)
		u := parseUnit(t, "systemd/imagepipe-"+name+".service")
		if want := systemdDuration(t, u.get("Service", "TimeoutStopSec")); grace != want {
			t.Errorf("%s: stop_grace_period %s, want the unit's TimeoutStopSec, %s", name, grace, want)
		}
		if grace <= cfg.AckWait {
			t.Errorf("%s: stop_grace_period %s is within IMAGEPIPE_ACK_WAIT (%s)", name, grace, cfg.AckWait)
		}
	}
	grace := time.Duration(*p.Services["convert"].StopGracePeriod)
	if limit := cfg.ConvertTimeoutBase + 25*cfg.ConvertTimeoutPerGiB; grace < limit {
		t.Errorf("convert: stop_grace_period %s, shorter than qemu-img's limit for a 25 GiB disk, %s", grace, limit)
	}
}

// TestComposeChecksHealthWithoutCurl: neither the imagepipe image nor
// MinIO's has curl. MinIO's own image ships mc, whose `mc ready local`
// asks /minio/health/cluster on the built-in alias for localhost:9000.
func TestComposeChecksHealthWithoutCurl(t *testing.T) {
	p := loadCompose(t)
	for name, s := range p.Services {
		if s.HealthCheck == nil {
			continue
		}
		if slices.Contains(s.HealthCheck.Test, "curl") {
			t.Errorf("%s: health check %v runs curl, which the image lacks", name, s.HealthCheck.Test)
		}
	}
	m := p.Services["minio"]
	if want := []string{"CMD", "mc", "ready", "local"}; !slices.Equal(m.HealthCheck.Test, want) {
		t.Errorf("minio: health check %v, want %v", m.HealthCheck.Test, want)
	}
	if m.HealthCheck.Timeout == nil || m.HealthCheck.Interval == nil || m.HealthCheck.Retries == nil {
		t.Error("minio: health check without timeout, interval and retries: mc ready waits as long as it is let")
	}
	dockerfile, err := os.ReadFile("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(dockerfile), " curl ") {
		t.Error("the Dockerfile installs curl, which nothing needs")
	}
}
