package kubernetes

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// The ScaledObjects are checked against the CRD that KEDA publishes in
// its Go module, fetched into the module cache by `go mod download`,
// rather than against a copy of KEDA's types kept here. Importing KEDA's
// Go types instead would pull controller-runtime and client-go into
// go.mod, at versions that do not build with this module's k8s.io/api.
const (
	kedaModule = "github.com/kedacore/keda/v2"
	// kedaVersion is the KEDA release the manifests are written and
	// checked for, and the chart README.md installs. Bump it with kedaModuleSum, the "Sum" that `go mod
	// download -json github.com/kedacore/keda/v2@VERSION` prints, which
	// pins the module's bytes as go.sum would.
	kedaVersion   = "v2.20.2"
	kedaModuleSum = "h1:SR60v8uIcelbveS8n/1jcl8tLdBBIbHMxmdOHw8tKqA="
	// kedaScaledObjectCRD is where the module holds the ScaledObject CRD.
	kedaScaledObjectCRD = "config/crd/bases/keda.sh_scaledobjects.yaml"
)

// kedaCELRules are the Go equivalents of the ScaledObject CRD's
// x-kubernetes-validations rules, keyed by the rule's text: a rule KEDA
// adds or rewords fails the load until it has one here.
var kedaCELRules = map[string]celRule{
	"!has(self.minReplicaCount) || self.minReplicaCount <= (has(self.maxReplicaCount) ? self.maxReplicaCount : 100)": func(spec map[string]any) error {
		lo, ok := spec["minReplicaCount"].(json.Number)
		if !ok {
			return nil
		}
		hi := json.Number("100")
		if n, ok := spec["maxReplicaCount"].(json.Number); ok {
			hi = n
		}
		l, errL := lo.Int64()
		h, errH := hi.Int64()
		if err := errors.Join(errL, errH); err != nil {
			return err
		}
		if l > h {
			return fmt.Errorf("minReplicaCount %d, maxReplicaCount %d", l, h)
		}
		return nil
	},
}

// kedaModuleDir is where the module cache holds KEDA's module.
var kedaModuleDir = sync.OnceValues(func() (string, error) {
	return downloadModule(kedaModule, kedaVersion, kedaModuleSum)
})

var scaledObjectCRD = sync.OnceValues(func() (*crdValidator, error) {
	dir, err := kedaModuleDir()
	if err != nil {
		return nil, err
	}
	doc, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(kedaScaledObjectCRD)))
	if err != nil {
		return nil, err
	}
	v, err := loadCRDSchema(doc, "ScaledObject", "v1alpha1", kedaCELRules)
	if err != nil {
		return nil, fmt.Errorf("%s@%s %s: %w", kedaModule, kedaVersion, kedaScaledObjectCRD, err)
	}
	return v, nil
})

// kedaCRD is the validator of KEDA's ScaledObject CRD. A module that
// cannot be fetched fails the test: an unchecked ScaledObject is not a
// pass.
func kedaCRD(t *testing.T) *crdValidator {
	t.Helper()
	v, err := scaledObjectCRD()
	if err != nil {
		t.Fatalf("KEDA's ScaledObject CRD: %v", err)
	}
	return v
}

// downloadModule fetches a module into the module cache with the go
// command and returns its directory, once the go command has checked it
// against the checksum database and it has the expected sum.
func downloadModule(path, version, sum string) (string, error) {
	tmp, err := os.MkdirTemp("", "moddownload")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	var stdout, stderr bytes.Buffer
	// Outside any module, so this module's go.mod and go.sum stay as they are.
	cmd := exec.Command("go", "mod", "download", "-json", path+"@"+version)
	cmd.Dir = tmp
	cmd.Env = append(os.Environ(), "GO111MODULE=on", "GOWORK=off", "GOFLAGS=")
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	runErr := cmd.Run()
	var m struct{ Dir, Sum, Error string }
	if err := json.Unmarshal(stdout.Bytes(), &m); err != nil || runErr != nil || m.Error != "" {
		return "", fmt.Errorf("go mod download %s@%s failed (the module proxy, GOPROXY, must be reachable or the module already in the module cache): %v %s %s",
			path, version, runErr, m.Error, strings.TrimSpace(stderr.String()))
	}
	if m.Sum != sum {
		return "", fmt.Errorf("%s@%s has sum %s, want %s", path, version, m.Sum, sum)
	}
	return m.Dir, nil
}

// scaledObject is what the tests read of a ScaledObject once it has
// passed KEDA's CRD; it is decoded leniently, as the CRD is the check.
type scaledObject struct {
	Spec struct {
		ScaleTargetRef *struct {
			Name string `json:"name"`
		} `json:"scaleTargetRef"`
		MinReplicaCount *int32 `json:"minReplicaCount"`
		MaxReplicaCount *int32 `json:"maxReplicaCount"`
		Triggers        []struct {
			Type     string            `json:"type"`
			Metadata map[string]string `json:"metadata"`
		} `json:"triggers"`
	} `json:"spec"`
}

// kedaNATSScaler is the source of KEDA's nats-jetstream scaler within
// the module, and natsJetStreamMetadata the struct whose keda:"..." tags
// say which trigger metadata it reads.
const kedaNATSScaler = "pkg/scalers/nats_jetstream_scaler.go"

// natsJetStreamKeys are the trigger metadata keys KEDA's nats-jetstream
// scaler reads, and whether each must be set, as KEDA's typed config
// (pkg/scalers/scalersconfig/typed_config.go) reads the tags of
// natsJetStreamMetadata: a key is in the trigger's metadata when its
// order names triggerMetadata, and required unless optional, defaulted
// or deprecated.
func natsJetStreamKeys(t *testing.T) map[string]bool {
	t.Helper()
	dir, err := kedaModuleDir()
	if err != nil {
		t.Fatalf("KEDA's nats-jetstream scaler: %v", err)
	}
	name := filepath.Join(dir, filepath.FromSlash(kedaNATSScaler))
	f, err := parser.ParseFile(token.NewFileSet(), name, nil, parser.SkipObjectResolution)
	if err != nil {
		t.Fatal(err)
	}
	keys := map[string]bool{}
	ast.Inspect(f, func(n ast.Node) bool {
		ts, ok := n.(*ast.TypeSpec)
		if !ok || ts.Name.Name != "natsJetStreamMetadata" {
			return true
		}
		for _, field := range ts.Type.(*ast.StructType).Fields.List {
			if field.Tag == nil {
				continue
			}
			tag, err := strconv.Unquote(field.Tag.Value)
			if err != nil {
				t.Fatal(err)
			}
			kedaTag, ok := reflect.StructTag(tag).Lookup("keda")
			if !ok {
				continue
			}
			var names []string
			inMetadata, required := false, true
			for _, param := range strings.Split(kedaTag, ",") {
				k, v, _ := strings.Cut(strings.TrimSpace(param), "=")
				switch k {
				case "name":
					names = strings.Split(v, ";")
				case "order":
					inMetadata = slices.Contains(strings.Split(v, ";"), "triggerMetadata")
				case "optional":
					if b, err := strconv.ParseBool(v); v == "" || err == nil && b {
						required = false
					}
				case "default":
					if v != "" {
						required = false
					}
				case "deprecated":
					required = false
				}
			}
			for _, n := range names {
				if inMetadata {
					keys[strings.TrimSpace(n)] = required
				}
			}
		}
		return false
	})
	// The scaler cannot work without a stream and a consumer: if they do
	// not come out required, the tags are read wrongly or have changed.
	if !keys["stream"] || !keys["consumer"] {
		t.Fatalf("%s@%s %s: natsJetStreamMetadata read as %v, want stream and consumer required; the scaler has changed", kedaModule, kedaVersion, kedaNATSScaler, keys)
	}
	return keys
}

// validScaledObject passes KEDA's CRD; each case of
// TestKEDACRDRefusesWhatTheAPIServerWould breaks it in one place.
const validScaledObject = `apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: imagepipe-convert
  labels:
    app: imagepipe
spec:
  scaleTargetRef:
    name: imagepipe-convert
  minReplicaCount: 0
  maxReplicaCount: 10
  advanced:
    horizontalPodAutoscalerConfig:
      behavior:
        scaleDown:
          stabilizationWindowSeconds: 300
          tolerance: "0.05"
          policies:
            - type: Pods
              value: 1
              periodSeconds: 60
  fallback:
    failureThreshold: 3
    replicas: 1
    behavior: static
  triggers:
    - type: nats-jetstream
      metadata:
        stream: JOBS
        lagThreshold: "2"
`

func TestKEDACRDRefusesWhatTheAPIServerWould(t *testing.T) {
	crd := kedaCRD(t)
	if err := crd.validate([]byte(validScaledObject)); err != nil {
		t.Fatalf("the valid ScaledObject is refused: %v", err)
	}
	for _, tc := range []struct {
		name, from, to, want string
	}{
		{"misspelt trigger field", "      metadata:\n        stream", "      metdata:\n        stream", `spec.triggers[0]: unknown field "metdata"`},
		{"misspelt spec field", "  minReplicaCount: 0", "  minReplicas: 0", `spec: unknown field "minReplicas"`},
		{"misspelt field deep in the HPA behavior", "periodSeconds: 60", "periodSecond: 60", `spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown.policies[0]: unknown field "periodSecond"`},
		{"misspelt object metadata", "  labels:", "  label:", `unknown field "label"`},
		{"count as a string", "maxReplicaCount: 10", `maxReplicaCount: "10"`, `spec.maxReplicaCount: string "10", want integer`},
		{"fraction as a count", "maxReplicaCount: 10", "maxReplicaCount: 1.5", "spec.maxReplicaCount: 1.5 is not an integer"},
		{"metadata value not a string", `lagThreshold: "2"`, "lagThreshold: 2", "spec.triggers[0].metadata.lagThreshold: number 2, want a string"},
		{"triggers not a list", "  triggers:\n    - type: nats-jetstream\n      metadata:\n        stream: JOBS\n        lagThreshold: \"2\"\n", "  triggers: {}\n", "spec.triggers: object, want an array"},
		{"value out of its enum", "behavior: static", "behavior: sometimes", "spec.fallback.behavior: sometimes is not one of"},
		{"under the minimum", "maxReplicaCount: 10", "maxReplicaCount: 0", "spec.maxReplicaCount: 0 is under the minimum 1"},
		{"required field missing", "    name: imagepipe-convert\n  minReplicaCount", "    kind: Deployment\n  minReplicaCount", `spec.scaleTargetRef: required field "name" missing`},
		{"CEL rule broken", "minReplicaCount: 0", "minReplicaCount: 11", "minReplicaCount must be less than or equal to maxReplicaCount"},
		{"int-or-string neither", `tolerance: "0.05"`, "tolerance: true", "spec.advanced.horizontalPodAutoscalerConfig.behavior.scaleDown.tolerance: boolean true, want an integer or a string"},
		{"int-or-string off its pattern", `tolerance: "0.05"`, `tolerance: "5%"`, `scaleDown.tolerance: "5%" does not match`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			doc := strings.Replace(validScaledObject, tc.from, tc.to, 1)
			if doc == validScaledObject {
				t.Fatalf("%q is not in the valid ScaledObject", tc.from)
			}
			err := crd.validate([]byte(doc))
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("refused with %q, want it to say %q", err, tc.want)
			}
		})
	}
}

// The README's walkthrough installs the KEDA whose schema the manifests
// are checked against.
func TestREADMEInstallsTheKEDAVersionTheManifestsAreCheckedFor(t *testing.T) {
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	want := "helm install keda kedacore/keda --version " + strings.TrimPrefix(kedaVersion, "v") + " "
	if !strings.Contains(string(b), want) {
		t.Errorf("README.md does not install KEDA with %q", want)
	}
}
