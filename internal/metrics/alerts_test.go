package metrics_test

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/imagepipe/imagepipe/internal/metrics"
)

// alertRules are the Prometheus alert rules the README offers, parsed as
// Prometheus would read them.
type alertRules struct {
	Groups []struct {
		Name  string `json:"name"`
		Rules []struct {
			Alert       string            `json:"alert"`
			Expr        string            `json:"expr"`
			For         string            `json:"for"`
			Annotations map[string]string `json:"annotations"`
		} `json:"rules"`
	} `json:"groups"`
}

// readmeAlertRules returns the README's block of alert rules and the
// names of the metrics its table documents.
func readmeAlertRules(t *testing.T) (alertRules, map[string]bool) {
	t.Helper()
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	documented := map[string]bool{}
	for _, m := range regexp.MustCompile("(?m)^\\| `(imagepipe_[a-z_]+)`").FindAllStringSubmatch(readme, -1) {
		documented[m[1]] = true
	}
	for _, block := range strings.Split(readme, "```yaml\n")[1:] {
		body, _, _ := strings.Cut(block, "```")
		if !strings.HasPrefix(body, "groups:") {
			continue
		}
		var rules alertRules
		if err := yaml.UnmarshalStrict([]byte(body), &rules); err != nil {
			t.Fatalf("README's alert rules do not parse: %v\n%s", err, body)
		}
		return rules, documented
	}
	t.Fatal("README.md has no block of alert rules (```yaml starting with groups:)")
	return alertRules{}, nil
}

func TestREADMEAlertRulesParseAndUseOnlyDocumentedMetrics(t *testing.T) {
	rules, documented := readmeAlertRules(t)
	seen := map[string]bool{}
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			seen[r.Alert] = true
			if r.Alert == "" || r.Expr == "" || r.For == "" || r.Annotations["summary"] == "" {
				t.Errorf("rule %+v lacks an alert name, expr, for or summary", r)
			}
			for _, name := range regexp.MustCompile(`imagepipe_[a-z_]+`).FindAllString(r.Expr, -1) {
				if !documented[name] {
					t.Errorf("rule %s uses %s, which the README's metrics table does not document", r.Alert, name)
				}
			}
		}
	}
	if !seen["ImagepipeUploadsWithoutJob"] {
		t.Error("no alert rule covers uploads whose job was lost (imagepipe_uploads_without_job)")
	}
}

// The gauge shows the count of the replica that counts, and nothing from
// one that stopped counting: a stale figure must not hold an alert up.
func TestUploadsWithoutJobGaugeShowsOnlyAKnownCount(t *testing.T) {
	m := metrics.New("test", nil)
	record := m.OrphanRecorder()
	if again := m.OrphanRecorder(); again == nil {
		t.Fatal("a second OrphanRecorder is nil")
	}
	value := func() (float64, bool) {
		fams, err := m.Registry().Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range fams {
			if f.GetName() == "imagepipe_uploads_without_job" && len(f.GetMetric()) == 1 {
				return f.GetMetric()[0].GetGauge().GetValue(), true
			}
		}
		return 0, false
	}
	if _, shown := value(); shown {
		t.Error("the gauge is shown before anything was counted")
	}
	record(3, true)
	if v, shown := value(); !shown || v != 3 {
		t.Errorf("gauge %v (shown %v), want 3", v, shown)
	}
	record(0, false)
	if v, shown := value(); shown {
		t.Errorf("gauge %v shown after the replica stopped counting", v)
	}
}
