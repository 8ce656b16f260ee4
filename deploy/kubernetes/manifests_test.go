package kubernetes

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"

	"github.com/imagepipe/imagepipe/events"
)

// functions are the long-running commands of the one binary, each its
// own Deployment.
var functions = []string{"ingest", "convert", "notify"}

// consumers are the stream and durable consumer each function binds
// (cmd/imagepipe/fn_*.go), which its ScaledObject must read.
var consumers = map[string][2]string{
	"ingest":  {events.StreamS3Events, "ingest"},
	"convert": {events.StreamJobs, "convert"},
	"notify":  {events.StreamResults, "notify"},
}

const (
	// transferRate is the slowest S3 throughput, in bytes per second,
	// for which convert's grace period must cover a job's download and
	// upload.
	transferRate = 100 << 20
	// maxAckPending is the MaxAckPending of every function's consumer
	// (internal/natsrt, Binding.consumerConfig).
	maxAckPending = 1000
	// secretDir is where each pod's Secret is mounted.
	secretDir = "/var/run/secrets/imagepipe"
)

// rendered is one overlay's output, decoded.
type rendered struct {
	deployments   map[string]*appsv1.Deployment
	jobs          map[string]*batchv1.Job
	pdbs          []*policyv1.PodDisruptionBudget
	configMaps    map[string]*corev1.ConfigMap
	scaledObjects map[string]*scaledObject
}

// overlays lists every directory a user may `kubectl apply -k`: the base
// and each overlay.
func overlays(t *testing.T) []string {
	t.Helper()
	dirs := []string{"base"}
	entries, err := os.ReadDir("overlays")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.IsDir() {
			dirs = append(dirs, path.Join("overlays", e.Name()))
		}
	}
	if len(dirs) < 3 {
		t.Fatalf("found %v, want the base, overlays/production and overlays/compose", dirs)
	}
	return dirs
}

// render runs Kustomize as `kubectl kustomize DIR` does and decodes
// every document strictly into its API type: a field the type lacks
// (a typo, a field of another version) fails. A ScaledObject is checked
// against KEDA's published CRD instead.
func render(t *testing.T, dir string) rendered {
	t.Helper()
	m, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	r := rendered{
		deployments:   map[string]*appsv1.Deployment{},
		jobs:          map[string]*batchv1.Job{},
		configMaps:    map[string]*corev1.ConfigMap{},
		scaledObjects: map[string]*scaledObject{},
	}
	for _, res := range m.Resources() {
		doc, err := res.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal(doc, &tm); err != nil {
			t.Fatal(err)
		}
		what := fmt.Sprintf("%s: %s %s", dir, tm.Kind, res.GetName())
		var obj any
		switch tm.APIVersion + " " + tm.Kind {
		case "apps/v1 Deployment":
			d := &appsv1.Deployment{}
			r.deployments[res.GetName()], obj = d, d
		case "batch/v1 Job":
			j := &batchv1.Job{}
			r.jobs[res.GetName()], obj = j, j
		case "policy/v1 PodDisruptionBudget":
			p := &policyv1.PodDisruptionBudget{}
			r.pdbs, obj = append(r.pdbs, p), p
		case "v1 ConfigMap":
			c := &corev1.ConfigMap{}
			r.configMaps[res.GetName()], obj = c, c
		case "keda.sh/v1alpha1 ScaledObject":
			if err := kedaCRD(t).validate(doc); err != nil {
				t.Fatalf("%s does not pass the CRD of KEDA %s: %v", what, kedaVersion, err)
			}
			s := &scaledObject{}
			if err := yaml.Unmarshal(doc, s); err != nil {
				t.Fatal(err)
			}
			r.scaledObjects[res.GetName()] = s
			continue
		case "v1 Namespace":
			obj = &corev1.Namespace{}
		case "v1 ServiceAccount":
			obj = &corev1.ServiceAccount{}
		case "v1 Service":
			obj = &corev1.Service{}
		case "v1 Secret":
			obj = &corev1.Secret{}
		default:
			t.Fatalf("%s: no API type to check it against; add one here", what)
		}
		if err := yaml.UnmarshalStrict(doc, obj); err != nil {
			t.Fatalf("%s does not decode strictly: %v", what, err)
		}
	}
	return r
}

func TestEveryOverlayRendersAndDecodesStrictly(t *testing.T) {
	for _, dir := range overlays(t) {
		r := render(t, dir)
		for _, fn := range functions {
			if r.deployments["imagepipe-"+fn] == nil {
				t.Errorf("%s: no Deployment imagepipe-%s", dir, fn)
			}
		}
		if r.jobs["imagepipe-setup"] == nil {
			t.Errorf("%s: no Job imagepipe-setup", dir)
		}
	}
}

// container is the pod's one imagepipe container, with the settings it
// gets from the ConfigMap folded into its environment.
type container struct {
	c   corev1.Container
	pod corev1.PodSpec
	env map[string]string
}

func (r rendered) container(t *testing.T, what string, pod corev1.PodSpec) container {
	t.Helper()
	if len(pod.Containers) != 1 {
		t.Fatalf("%s: %d containers, want 1", what, len(pod.Containers))
	}
	c := pod.Containers[0]
	env := map[string]string{}
	for _, from := range c.EnvFrom {
		if from.ConfigMapRef == nil {
			t.Fatalf("%s: envFrom other than a ConfigMap", what)
		}
		cm := r.configMaps[from.ConfigMapRef.Name]
		if cm == nil {
			t.Fatalf("%s: ConfigMap %s is not rendered", what, from.ConfigMapRef.Name)
		}
		for k, v := range cm.Data {
			env[k] = v
		}
	}
	for _, e := range c.Env {
		if e.ValueFrom != nil {
			t.Errorf("%s: %s comes from valueFrom; secrets are files and settings plain values", what, e.Name)
			continue
		}
		env[e.Name] = e.Value
	}
	return container{c: c, pod: pod, env: env}
}

func TestEveryPodIsLockedDown(t *testing.T) {
	for _, dir := range overlays(t) {
		r := render(t, dir)
		pods := map[string]corev1.PodSpec{"setup": r.jobs["imagepipe-setup"].Spec.Template.Spec}
		for _, fn := range functions {
			pods[fn] = r.deployments["imagepipe-"+fn].Spec.Template.Spec
		}
		for name, pod := range pods {
			what := dir + ": " + name
			c := r.container(t, what, pod)
			if pod.AutomountServiceAccountToken == nil || *pod.AutomountServiceAccountToken {
				t.Errorf("%s: the service account token is mounted", what)
			}
			ps := pod.SecurityContext
			if ps == nil || ps.RunAsNonRoot == nil || !*ps.RunAsNonRoot || ps.RunAsUser == nil || *ps.RunAsUser == 0 {
				t.Errorf("%s: pod may run as root", what)
			}
			if ps == nil || ps.SeccompProfile == nil || ps.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
				t.Errorf("%s: pod seccomp profile is not RuntimeDefault", what)
			}
			sc := c.c.SecurityContext
			switch {
			case sc == nil:
				t.Errorf("%s: container has no securityContext", what)
			case sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot:
				t.Errorf("%s: container runAsNonRoot is not true", what)
			case sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
				t.Errorf("%s: root file system is writable", what)
			case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
				t.Errorf("%s: privilege escalation allowed", what)
			case sc.Capabilities == nil || !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(sc.Capabilities.Add) > 0:
				t.Errorf("%s: capabilities are not exactly drop ALL", what)
			case sc.SeccompProfile == nil || sc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault:
				t.Errorf("%s: container seccomp profile is not RuntimeDefault", what)
			case sc.Privileged != nil && *sc.Privileged:
				t.Errorf("%s: privileged", what)
			}
			checkResources(t, what, c.c.Resources)
			checkSecretsAreFiles(t, what, name, c)
			if !slices.Equal(c.c.Args, []string{name}) {
				t.Errorf("%s: args %v, want [%s]", what, c.c.Args, name)
			}
		}
	}
}

func checkResources(t *testing.T, what string, res corev1.ResourceRequirements) {
	t.Helper()
	for _, n := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		req, okReq := res.Requests[n]
		lim, okLim := res.Limits[n]
		if !okReq || !okLim {
			t.Errorf("%s: %s request or limit missing", what, n)
			continue
		}
		if req.Cmp(lim) > 0 {
			t.Errorf("%s: %s request %s over its limit %s", what, n, req.String(), lim.String())
		}
	}
}

// secretVariables are the settings that hold a secret themselves; in a
// pod each comes from a file instead.
var secretVariables = []string{
	"IMAGEPIPE_S3_ACCESS_KEY", "IMAGEPIPE_S3_SECRET_KEY", "IMAGEPIPE_WEBHOOK_SECRET",
	"IMAGEPIPE_SMTP_PASSWORD", "IMAGEPIPE_SLACK_TOKEN", "IMAGEPIPE_SLACK_WEBHOOK_URL", "IMAGEPIPE_DISCORD_WEBHOOK_URL",
}

// checkSecretsAreFiles: no secret in the environment or the ConfigMap,
// the NATS password (and, but for notify, the S3 keys) named as files,
// and every such file inside a mounted Secret.
func checkSecretsAreFiles(t *testing.T, what, name string, c container) {
	t.Helper()
	for _, v := range secretVariables {
		if _, ok := c.env[v]; ok {
			t.Errorf("%s: %s is set in the environment; use %s_FILE from a Secret", what, v, v)
		}
	}
	if u := c.env["IMAGEPIPE_NATS_URL"]; strings.Contains(u, "@") {
		t.Errorf("%s: IMAGEPIPE_NATS_URL holds credentials; use IMAGEPIPE_NATS_USER and IMAGEPIPE_NATS_PASSWORD_FILE", what)
	}
	files := []string{"IMAGEPIPE_NATS_PASSWORD_FILE"}
	if name != "notify" {
		files = append(files, "IMAGEPIPE_S3_ACCESS_KEY_FILE", "IMAGEPIPE_S3_SECRET_KEY_FILE")
	}
	if c.env["IMAGEPIPE_NATS_USER"] == "" {
		t.Errorf("%s: IMAGEPIPE_NATS_USER is not set", what)
	}
	secretMounts := map[string]bool{}
	for _, m := range c.c.VolumeMounts {
		for _, v := range c.pod.Volumes {
			if v.Name == m.Name && v.Secret != nil {
				if !m.ReadOnly {
					t.Errorf("%s: Secret volume %s is mounted writable", what, m.Name)
				}
				secretMounts[m.MountPath] = true
			}
		}
	}
	for _, f := range files {
		p := c.env[f]
		if p == "" {
			t.Errorf("%s: %s is not set", what, f)
			continue
		}
		if !secretMounts[filepath.Dir(p)] {
			t.Errorf("%s: %s=%s is not in a mounted Secret (mounted: %v)", what, f, p, secretMounts)
		}
	}
}

func TestEveryFunctionIsProbedOnItsMetricsPort(t *testing.T) {
	for _, dir := range overlays(t) {
		r := render(t, dir)
		for _, fn := range functions {
			what := dir + ": " + fn
			c := r.container(t, what, r.deployments["imagepipe-"+fn].Spec.Template.Spec)
			_, port, err := net.SplitHostPort(c.env["IMAGEPIPE_METRICS_ADDR"])
			if err != nil {
				t.Fatalf("%s: IMAGEPIPE_METRICS_ADDR %q: %v", what, c.env["IMAGEPIPE_METRICS_ADDR"], err)
			}
			var metricsPort string
			for _, p := range c.c.Ports {
				if p.Name == "metrics" {
					metricsPort = strconv.Itoa(int(p.ContainerPort))
				}
			}
			if metricsPort != port {
				t.Errorf("%s: container port \"metrics\" is %q, IMAGEPIPE_METRICS_ADDR listens on %q", what, metricsPort, port)
			}
			for probe, want := range map[*corev1.Probe]string{c.c.LivenessProbe: "/healthz", c.c.ReadinessProbe: "/readyz"} {
				if probe == nil || probe.HTTPGet == nil {
					t.Errorf("%s: no HTTP probe for %s", what, want)
					continue
				}
				if probe.HTTPGet.Path != want || probe.HTTPGet.Port.String() != "metrics" {
					t.Errorf("%s: probe asks %s on %s, want %s on metrics", what, probe.HTTPGet.Path, probe.HTTPGet.Port.String(), want)
				}
			}
		}
	}
}

func TestConvertDrainsWithinItsGracePeriodOnScratchForTheLargestImage(t *testing.T) {
	for _, dir := range overlays(t) {
		r := render(t, dir)
		for _, fn := range functions {
			g := r.deployments["imagepipe-"+fn].Spec.Template.Spec.TerminationGracePeriodSeconds
			if g == nil || *g < 30 {
				t.Errorf("%s: %s has no grace period to drain in", dir, fn)
			}
		}
		pod := r.deployments["imagepipe-convert"].Spec.Template.Spec
		c := r.container(t, dir+": convert", pod)
		if g, need := time.Duration(*pod.TerminationGracePeriodSeconds)*time.Second, longestJob(t, dir, c.env); g < need {
			t.Errorf("%s: convert's grace period is %s; the largest image's job may take %s", dir, g, need)
		}
		scratch := c.env["IMAGEPIPE_SCRATCH_DIR"]
		var size *resource.Quantity
		for _, m := range c.c.VolumeMounts {
			for _, v := range pod.Volumes {
				if v.Name == m.Name && m.MountPath == scratch && v.Ephemeral != nil && v.Ephemeral.VolumeClaimTemplate != nil {
					q := v.Ephemeral.VolumeClaimTemplate.Spec.Resources.Requests[corev1.ResourceStorage]
					size = &q
				}
			}
		}
		if size == nil {
			t.Fatalf("%s: IMAGEPIPE_SCRATCH_DIR %q is not a generic ephemeral volume", dir, scratch)
		}
		jobs := mustInt(t, dir, c.env, "IMAGEPIPE_MAX_CONCURRENT_JOBS")
		largest := mustInt(t, dir, c.env, "IMAGEPIPE_MAX_VIRTUAL_SIZE")
		// Each job holds its input and its output; the reserve is at most 1 GiB.
		need := jobs*2*largest + 1<<30
		if size.Value() < need {
			t.Errorf("%s: scratch is %s, %d jobs of %d bytes need %d", dir, size.String(), jobs, largest, need)
		}
	}
}

// longestJob is how long a job for the largest image allowed may run
// before convert gives up on it: qemu-img's wall-clock limit for its
// virtual size, and the download and upload of that many bytes.
func longestJob(t *testing.T, dir string, env map[string]string) time.Duration {
	t.Helper()
	duration := func(k, def string) time.Duration {
		v := env[k]
		if v == "" {
			v = def
		}
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("%s: %s=%q: %v", dir, k, v, err)
		}
		return d
	}
	largest := mustInt(t, dir, env, "IMAGEPIPE_MAX_VIRTUAL_SIZE")
	gib := (largest + 1<<30 - 1) >> 30
	convert := duration("IMAGEPIPE_CONVERT_TIMEOUT_BASE", "5m") + time.Duration(gib)*duration("IMAGEPIPE_CONVERT_TIMEOUT_PER_GIB", "1m")
	transfer := time.Duration(2*largest/transferRate) * time.Second
	return convert + transfer
}

func mustInt(t *testing.T, dir string, env map[string]string, k string) int64 {
	t.Helper()
	n, err := strconv.ParseInt(env[k], 10, 64)
	if err != nil {
		t.Fatalf("%s: %s=%q: %v", dir, k, env[k], err)
	}
	return n
}

func TestEveryFunctionHasADisruptionBudget(t *testing.T) {
	for _, dir := range overlays(t) {
		r := render(t, dir)
		for _, fn := range functions {
			labels := r.deployments["imagepipe-"+fn].Spec.Template.Labels
			found := false
			for _, p := range r.pdbs {
				sel, err := metav1.LabelSelectorAsSelector(p.Spec.Selector)
				if err != nil {
					t.Fatal(err)
				}
				if sel.Matches(labelSet(labels)) && (p.Spec.MaxUnavailable != nil || p.Spec.MinAvailable != nil) {
					found = true
				}
			}
			if !found {
				t.Errorf("%s: no PodDisruptionBudget selects %s's pods", dir, fn)
			}
		}
	}
}

type labelSet map[string]string

func (l labelSet) Has(k string) bool   { _, ok := l[k]; return ok }
func (l labelSet) Get(k string) string { return l[k] }
func (l labelSet) Lookup(k string) (string, bool) {
	v, ok := l[k]
	return v, ok
}

func TestScaledObjectsReadEachFunctionsConsumerLag(t *testing.T) {
	r := render(t, "overlays/production")
	scalerKeys := natsJetStreamKeys(t)
	for _, fn := range functions {
		so := r.scaledObjects["imagepipe-"+fn]
		if so == nil {
			t.Fatalf("no ScaledObject for %s", fn)
		}
		if so.Spec.ScaleTargetRef == nil || so.Spec.ScaleTargetRef.Name != "imagepipe-"+fn {
			t.Errorf("%s: ScaledObject scales %+v", fn, so.Spec.ScaleTargetRef)
		}
		if len(so.Spec.Triggers) != 1 || so.Spec.Triggers[0].Type != "nats-jetstream" {
			t.Fatalf("%s: triggers %+v, want one nats-jetstream", fn, so.Spec.Triggers)
		}
		md := so.Spec.Triggers[0].Metadata
		for k := range md {
			if _, ok := scalerKeys[k]; !ok {
				t.Errorf("%s: trigger metadata %q is not read by KEDA's nats-jetstream scaler", fn, k)
			}
		}
		for k, required := range scalerKeys {
			if required && md[k] == "" {
				t.Errorf("%s: trigger metadata %q missing", fn, k)
			}
		}
		if md["account"] == "" && md["accountID"] == "" {
			t.Errorf("%s: neither account nor accountID set", fn)
		}
		for _, k := range []string{"lagThreshold", "activationLagThreshold"} {
			if n, err := strconv.Atoi(md[k]); err != nil || n < 0 {
				t.Errorf("%s: %s=%q is not a count", fn, k, md[k])
			}
		}
		if want := consumers[fn]; md["stream"] != want[0] || md["consumer"] != want[1] {
			t.Errorf("%s: scales on %s/%s, the function consumes %s/%s", fn, md["stream"], md["consumer"], want[0], want[1])
		}
		wantMin := int32(1)
		if fn == "convert" {
			wantMin = 0
		}
		if so.Spec.MinReplicaCount == nil || *so.Spec.MinReplicaCount != wantMin {
			t.Errorf("%s: minReplicaCount %v, want %d", fn, so.Spec.MinReplicaCount, wantMin)
		}
		if so.Spec.MaxReplicaCount == nil || *so.Spec.MaxReplicaCount < wantMin+1 {
			t.Errorf("%s: maxReplicaCount %v leaves nothing to scale", fn, so.Spec.MaxReplicaCount)
		}
	}
	convert := r.scaledObjects["imagepipe-convert"]
	c := r.container(t, "convert", r.deployments["imagepipe-convert"].Spec.Template.Spec)
	jobs := mustInt(t, "convert", c.env, "IMAGEPIPE_MAX_CONCURRENT_JOBS")
	if held := int64(*convert.Spec.MaxReplicaCount) * jobs; held > maxAckPending {
		t.Errorf("%d convert replicas x %d jobs = %d, over the consumer's MaxAckPending %d: replicas past it would sit idle", *convert.Spec.MaxReplicaCount, jobs, held, maxAckPending)
	}
	if md := convert.Spec.Triggers[0].Metadata; md["lagThreshold"] != strconv.FormatInt(jobs, 10) {
		t.Errorf("convert lagThreshold %s, want IMAGEPIPE_MAX_CONCURRENT_JOBS %d: one replica per that many jobs", md["lagThreshold"], jobs)
	}
}

// composeOnly are the settings of infra/compose/*.env that the Kubernetes
// deployment sets otherwise: addresses of servers that live elsewhere,
// and secrets, which are files here.
var composeOnly = map[string]bool{
	"IMAGEPIPE_NATS_URL": true, "IMAGEPIPE_S3_ENDPOINT": true,
	"IMAGEPIPE_S3_ACCESS_KEY": true, "IMAGEPIPE_S3_SECRET_KEY": true,
}

func TestComposeOverlayReproducesTheComposeSettings(t *testing.T) {
	r := render(t, "overlays/compose")
	pods := map[string]corev1.PodSpec{"setup": r.jobs["imagepipe-setup"].Spec.Template.Spec}
	for _, fn := range functions {
		pods[fn] = r.deployments["imagepipe-"+fn].Spec.Template.Spec
	}
	for name, pod := range pods {
		c := r.container(t, name, pod)
		compose := readEnvFile(t, filepath.Join("..", "..", "infra", "compose", name+".env"))
		for k, v := range compose {
			if composeOnly[k] {
				continue
			}
			if got, ok := c.env[k]; !ok || got != v {
				t.Errorf("%s: %s=%q in compose, %q (set %v) here", name, k, v, got, ok)
			}
		}
	}
	if got := r.deployments["imagepipe-convert"].Spec.Replicas; got == nil || *got != 2 {
		t.Errorf("convert replicas %v, compose runs 2", got)
	}
	if len(r.scaledObjects) != 0 {
		t.Errorf("compose runs fixed replicas, yet %d ScaledObjects are rendered", len(r.scaledObjects))
	}
}

// readEnvFile reads KEY=VALUE lines of an env file, skipping comments.
func readEnvFile(t *testing.T, name string) map[string]string {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	env := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("%s: %q is not KEY=VALUE", name, line)
		}
		env[k] = v
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	if len(env) == 0 {
		t.Fatalf("%s: no settings", name)
	}
	return env
}

// TestScalersReadTheNATSTheFunctionsUse: KEDA must ask the monitoring
// endpoint of the NATS the functions connect to, for the account their
// users live in (infra/nats/accounts.conf, which
// examples/nats-values.yaml installs), or it reads no lag at all and
// convert never leaves zero.
func TestScalersReadTheNATSTheFunctionsUse(t *testing.T) {
	accounts, err := os.ReadFile(filepath.Join("..", "..", "infra", "nats", "accounts.conf"))
	if err != nil {
		t.Fatal(err)
	}
	r := render(t, "overlays/production")
	c := r.container(t, "convert", r.deployments["imagepipe-convert"].Spec.Template.Spec)
	natsURL := c.env["IMAGEPIPE_NATS_URL"]
	// nats://RELEASE.NAMESPACE.svc:4222 -> RELEASE, NAMESPACE
	host, _, err := net.SplitHostPort(strings.TrimPrefix(natsURL, "nats://"))
	if err != nil {
		t.Fatalf("IMAGEPIPE_NATS_URL %q: %v", natsURL, err)
	}
	parts := strings.Split(host, ".")
	if len(parts) < 3 || parts[2] != "svc" {
		t.Fatalf("IMAGEPIPE_NATS_URL %q is not a service of the NATS chart", natsURL)
	}
	wantEndpoint := fmt.Sprintf("%s-headless.%s.svc.cluster.local:8222", parts[0], parts[1])
	for _, fn := range functions {
		md := r.scaledObjects["imagepipe-"+fn].Spec.Triggers[0].Metadata
		if md["natsServerMonitoringEndpoint"] != wantEndpoint {
			t.Errorf("%s: scaler asks %s, the functions use %s (monitoring on %s)", fn, md["natsServerMonitoringEndpoint"], natsURL, wantEndpoint)
		}
		if !strings.Contains(string(accounts), "\n  "+md["account"]+" {") {
			t.Errorf("%s: account %q is not an account of infra/nats/accounts.conf", fn, md["account"])
		}
	}
}
