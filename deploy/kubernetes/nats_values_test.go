package kubernetes

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// syncSetting is where values for the official NATS chart set JetStream's
// sync_interval: the chart merges config.jetstream.merge into the
// server's jetstream block (nats-io/k8s helm/charts/nats,
// files/config/config.yaml and the nats.loadMergePatch helper). Anywhere
// else the setting is another option or none.
const syncSetting = "config.jetstream.merge.sync_interval"

// checkNATSValuesSync reports whether chart values make JetStream write
// each message to disk before acknowledging it, set in the one place
// the chart reads it and nowhere else.
func checkNATSValuesSync(doc []byte) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	var values map[string]any
	if err := json.Unmarshal(j, &values); err != nil {
		return err
	}
	at := func(path ...string) any {
		var v any = values
		for _, k := range path {
			m, _ := v.(map[string]any)
			v = m[k]
		}
		return v
	}
	var errs []error
	if got := at("config", "jetstream", "enabled"); got != true {
		errs = append(errs, fmt.Errorf("config.jetstream.enabled is %v, want true", got))
	}
	if got := at(strings.Split(syncSetting, ".")...); got != "always" {
		errs = append(errs, fmt.Errorf("%s is %v, want always", syncSetting, got))
	}
	// sync is the option's other name in nats-server, and a patch (JSON
	// Patch, applied after merge) could rewrite it.
	var found []string
	var walk func(path string, v any)
	walk = func(path string, v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, sub := range v {
				p := strings.TrimPrefix(path+"."+k, ".")
				if k == "sync_interval" || k == "sync" {
					found = append(found, p)
				}
				walk(p, sub)
			}
		case []any:
			for i, sub := range v {
				walk(fmt.Sprintf("%s[%d]", path, i), sub)
			}
		case string:
			if strings.Contains(v, "sync") {
				found = append(found, path)
			}
		}
	}
	walk("", values)
	if slices.Sort(found); !slices.Equal(found, []string{syncSetting}) {
		errs = append(errs, fmt.Errorf("the sync setting appears at %v, want only at %s", found, syncSetting))
	}
	return errors.Join(errs...)
}

// TestNATSValuesSyncEveryWriteBeforeItsAck: the NATS installed with
// examples/nats-values.yaml acknowledges only what is on disk, like
// every other NATS config imagepipe ships (infra/nats/*.conf).
func TestNATSValuesSyncEveryWriteBeforeItsAck(t *testing.T) {
	name := filepath.Join("examples", "nats-values.yaml")
	doc, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := checkNATSValuesSync(doc); err != nil {
		t.Errorf("%s: %v", name, err)
	}
}

func TestNATSValuesCheckRefusesSyncMissingOrMisplaced(t *testing.T) {
	for name, doc := range map[string]string{
		"missing":                   "config:\n  jetstream:\n    enabled: true\n",
		"not always":                "config:\n  jetstream:\n    enabled: true\n    merge:\n      sync_interval: 2m\n",
		"outside the merge":         "config:\n  jetstream:\n    enabled: true\n    sync_interval: always\n",
		"in the top-level merge":    "config:\n  jetstream:\n    enabled: true\n  merge:\n    sync_interval: always\n",
		"also under its other name": "config:\n  jetstream:\n    enabled: true\n    merge:\n      sync_interval: always\n      sync: 1m\n",
		"patched away": "config:\n  jetstream:\n    enabled: true\n    merge:\n      sync_interval: always\n" +
			"    patch:\n      - {op: remove, path: /sync_interval}\n",
		"jetstream off": "config:\n  jetstream:\n    enabled: false\n    merge:\n      sync_interval: always\n",
	} {
		if checkNATSValuesSync([]byte(doc)) == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if err := checkNATSValuesSync([]byte("config:\n  jetstream:\n    enabled: true\n    merge:\n      sync_interval: always\n")); err != nil {
		t.Errorf("the right setting is refused: %v", err)
	}
}
