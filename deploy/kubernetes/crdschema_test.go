package kubernetes

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// crdSchema is one node of a CustomResourceDefinition's openAPIV3Schema,
// the structural schema the API server validates a custom resource with.
// The CRD is decoded into it with unknown fields refused, so a keyword
// this checker does not implement fails the load instead of being
// skipped: a newer CRD cannot loosen the check unnoticed.
type crdSchema struct {
	Description string                `json:"description,omitempty"`
	Type        string                `json:"type,omitempty"`
	Format      string                `json:"format,omitempty"`
	Nullable    bool                  `json:"nullable,omitempty"`
	Default     json.RawMessage       `json:"default,omitempty"`
	Enum        []any                 `json:"enum,omitempty"`
	Properties  map[string]*crdSchema `json:"properties,omitempty"`
	Required    []string              `json:"required,omitempty"`
	// AdditionalProperties is the schema of every value of a map; a
	// boolean here fails the load, as structural schemas have none.
	AdditionalProperties *crdSchema   `json:"additionalProperties,omitempty"`
	Items                *crdSchema   `json:"items,omitempty"`
	AnyOf                []*crdSchema `json:"anyOf,omitempty"`
	Minimum              *json.Number `json:"minimum,omitempty"`
	Maximum              *json.Number `json:"maximum,omitempty"`
	MinLength            *int         `json:"minLength,omitempty"`
	MaxLength            *int         `json:"maxLength,omitempty"`
	MinItems             *int         `json:"minItems,omitempty"`
	MaxItems             *int         `json:"maxItems,omitempty"`
	Pattern              string       `json:"pattern,omitempty"`

	IntOrString           bool   `json:"x-kubernetes-int-or-string,omitempty"`
	PreserveUnknownFields bool   `json:"x-kubernetes-preserve-unknown-fields,omitempty"`
	ListType              string `json:"x-kubernetes-list-type,omitempty"`
	Validations           []struct {
		Rule    string `json:"rule"`
		Message string `json:"message,omitempty"`
	} `json:"x-kubernetes-validations,omitempty"`

	pattern *regexp.Regexp
}

// celRule is the Go equivalent of one x-kubernetes-validations rule,
// run on the object the rule sits on. CEL itself is not evaluated here:
// its interpreter is a large dependency for the one or two rules a CRD
// has, so each rule gets an equivalent, and a rule without one fails
// the load.
type celRule func(self map[string]any) error

// crd is the part of a CustomResourceDefinition that names the resource
// and holds its schemas.
type crd struct {
	Spec struct {
		Group string `json:"group"`
		Names struct {
			Kind string `json:"kind"`
		} `json:"names"`
		Versions []struct {
			Name   string `json:"name"`
			Served bool   `json:"served"`
			Schema struct {
				OpenAPIV3Schema json.RawMessage `json:"openAPIV3Schema"`
			} `json:"schema"`
		} `json:"versions"`
	} `json:"spec"`
}

// crdValidator checks a custom resource against one version of its CRD.
type crdValidator struct {
	apiVersion, kind string
	root             *crdSchema
	rules            map[string]celRule
}

// loadCRDSchema reads the schema of kind in version from a CRD's YAML
// and checks that every keyword and CEL rule in it is one the validator
// enforces.
func loadCRDSchema(doc []byte, kind, version string, rules map[string]celRule) (*crdValidator, error) {
	var c crd
	if err := yaml.Unmarshal(doc, &c); err != nil {
		return nil, err
	}
	if c.Spec.Names.Kind != kind {
		return nil, fmt.Errorf("the CRD defines %s, not %s", c.Spec.Names.Kind, kind)
	}
	for _, v := range c.Spec.Versions {
		if v.Name != version {
			continue
		}
		if !v.Served {
			return nil, fmt.Errorf("%s %s is not served", kind, version)
		}
		dec := json.NewDecoder(bytes.NewReader(v.Schema.OpenAPIV3Schema))
		dec.DisallowUnknownFields()
		dec.UseNumber()
		root := &crdSchema{}
		if err := dec.Decode(root); err != nil {
			return nil, fmt.Errorf("openAPIV3Schema of %s: %w", version, err)
		}
		// validate leaves metadata to ObjectMeta, so its schema must add
		// nothing to it.
		if md := root.Properties["metadata"]; md != nil && !reflect.DeepEqual(*md, crdSchema{Type: "object", Description: md.Description}) {
			return nil, fmt.Errorf("openAPIV3Schema of %s constrains metadata, which is not checked here", version)
		}
		val := &crdValidator{apiVersion: c.Spec.Group + "/" + version, kind: kind, root: root, rules: rules}
		if err := val.compile(root, ""); err != nil {
			return nil, err
		}
		return val, nil
	}
	return nil, fmt.Errorf("the CRD has no version %s", version)
}

// compile refuses what the validator would not enforce and compiles
// each pattern once.
func (v *crdValidator) compile(s *crdSchema, path string) error {
	at := func(format string, a ...any) error {
		return fmt.Errorf("schema at %q: %s", path, fmt.Sprintf(format, a...))
	}
	switch s.Type {
	case "object", "array", "string", "integer", "number", "boolean":
	case "":
		if !s.IntOrString && !s.PreserveUnknownFields && path != "" {
			return at("no type")
		}
	default:
		return at("type %q", s.Type)
	}
	switch s.Format {
	case "", "int32", "int64", "date-time":
	default:
		return at("format %q is not checked here", s.Format)
	}
	if s.ListType != "" && s.ListType != "atomic" {
		return at("x-kubernetes-list-type %q is not checked here", s.ListType)
	}
	if s.Properties != nil && s.AdditionalProperties != nil {
		return at("both properties and additionalProperties")
	}
	if s.Pattern != "" {
		re, err := regexp.Compile(s.Pattern)
		if err != nil {
			return at("pattern: %v", err)
		}
		s.pattern = re
	}
	for _, r := range s.Validations {
		if v.rules[r.Rule] == nil {
			return at("CEL rule %q has no Go equivalent here; add one", r.Rule)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(s.Properties)) {
		if err := v.compile(s.Properties[name], join(path, name)); err != nil {
			return err
		}
	}
	for _, sub := range []*crdSchema{s.AdditionalProperties, s.Items} {
		if sub != nil {
			if err := v.compile(sub, path+"[*]"); err != nil {
				return err
			}
		}
	}
	for _, sub := range s.AnyOf {
		if err := v.compile(sub, path); err != nil {
			return err
		}
	}
	return nil
}

// validate checks one resource, as YAML, the way `kubectl apply` with
// strict field validation does: types, formats, bounds, enums, required
// fields, the CRD's rules, and no field the schema does not define. The
// root's metadata, which a CRD leaves to the API server, is decoded
// strictly into ObjectMeta.
func (v *crdValidator) validate(doc []byte) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.UseNumber()
	var obj map[string]any
	if err := dec.Decode(&obj); err != nil {
		return err
	}
	var errs []string
	if obj["apiVersion"] != v.apiVersion || obj["kind"] != v.kind {
		errs = append(errs, fmt.Sprintf("is %v %v, the schema is of %s %s", obj["apiVersion"], obj["kind"], v.apiVersion, v.kind))
	}
	if md, ok := obj["metadata"]; ok {
		b, err := json.Marshal(md)
		if err != nil {
			return err
		}
		if err := yaml.UnmarshalStrict(b, &metav1.ObjectMeta{}); err != nil {
			errs = append(errs, fmt.Sprintf("metadata: %v", err))
		}
		delete(obj, "metadata")
	}
	v.walk(v.root, obj, "", &errs)
	if len(errs) > 0 {
		return fmt.Errorf("%s", strings.Join(errs, "; "))
	}
	return nil
}

func (v *crdValidator) walk(s *crdSchema, val any, path string, errs *[]string) {
	fail := func(format string, a ...any) {
		at := path
		if at == "" {
			at = "(root)"
		}
		*errs = append(*errs, at+": "+fmt.Sprintf(format, a...))
	}
	if val == nil {
		if !s.Nullable {
			fail("null")
		}
		return
	}
	typ := s.Type
	if s.IntOrString {
		// The string checks (pattern, length) apply to a string value,
		// the number checks to an integer.
		typ = "integer"
		if _, isString := val.(string); isString {
			typ = "string"
		} else if !isInteger(val) {
			fail("%s, want an integer or a string", jsonType(val))
			return
		}
	}
	if len(s.Enum) > 0 && !slices.ContainsFunc(s.Enum, func(e any) bool { return reflect.DeepEqual(e, val) }) {
		fail("%v is not one of %v", val, s.Enum)
	}
	if len(s.AnyOf) > 0 && !slices.ContainsFunc(s.AnyOf, func(sub *crdSchema) bool {
		var subErrs []string
		v.walk(sub, val, path, &subErrs)
		return len(subErrs) == 0
	}) {
		fail("%v matches none of anyOf", val)
	}
	switch typ {
	case "object":
		m, ok := val.(map[string]any)
		if !ok {
			fail("%s, want an object", jsonType(val))
			return
		}
		for _, r := range s.Required {
			if _, ok := m[r]; !ok {
				fail("required field %q missing", r)
			}
		}
		for _, k := range slices.Sorted(maps.Keys(m)) {
			switch sub := s.Properties[k]; {
			case sub != nil:
				v.walk(sub, m[k], join(path, k), errs)
			case s.AdditionalProperties != nil:
				v.walk(s.AdditionalProperties, m[k], join(path, k), errs)
			case !s.PreserveUnknownFields:
				fail("unknown field %q", k)
			}
		}
		for _, r := range s.Validations {
			if err := v.rules[r.Rule](m); err != nil {
				fail("%s (%v)", r.Message, err)
			}
		}
	case "array":
		a, ok := val.([]any)
		if !ok {
			fail("%s, want an array", jsonType(val))
			return
		}
		if s.MinItems != nil && len(a) < *s.MinItems {
			fail("%d items, want at least %d", len(a), *s.MinItems)
		}
		if s.MaxItems != nil && len(a) > *s.MaxItems {
			fail("%d items, want at most %d", len(a), *s.MaxItems)
		}
		for i, e := range a {
			if s.Items != nil {
				v.walk(s.Items, e, fmt.Sprintf("%s[%d]", path, i), errs)
			}
		}
	case "string":
		str, ok := val.(string)
		if !ok {
			fail("%s, want a string", jsonType(val))
			return
		}
		if n := utf8.RuneCountInString(str); s.MinLength != nil && n < *s.MinLength || s.MaxLength != nil && n > *s.MaxLength {
			fail("length %d out of [%v, %v]", n, deref(s.MinLength), deref(s.MaxLength))
		}
		if s.pattern != nil && !s.pattern.MatchString(str) {
			fail("%q does not match %s", str, s.Pattern)
		}
		if s.Format == "date-time" {
			if _, err := time.Parse(time.RFC3339, str); err != nil {
				fail("not a date-time: %v", err)
			}
		}
	case "integer", "number":
		n, ok := val.(json.Number)
		if !ok {
			fail("%s, want %s", jsonType(val), typ)
			return
		}
		if typ == "integer" && !isInteger(n) {
			fail("%s is not an integer", n)
			return
		}
		f, _ := n.Float64()
		if s.Format == "int32" && (f < -1<<31 || f > 1<<31-1) {
			fail("%s is out of int32", n)
		}
		if s.Minimum != nil {
			if lo, _ := s.Minimum.Float64(); f < lo {
				fail("%s is under the minimum %s", n, *s.Minimum)
			}
		}
		if s.Maximum != nil {
			if hi, _ := s.Maximum.Float64(); f > hi {
				fail("%s is over the maximum %s", n, *s.Maximum)
			}
		}
	case "boolean":
		if _, ok := val.(bool); !ok {
			fail("%s, want a boolean", jsonType(val))
		}
	}
}

func isInteger(v any) bool {
	n, ok := v.(json.Number)
	if !ok {
		return false
	}
	_, err := strconv.ParseInt(string(n), 10, 64)
	return err == nil
}

func jsonType(v any) string {
	switch x := v.(type) {
	case map[string]any:
		return "object"
	case []any:
		return "array"
	case string:
		return fmt.Sprintf("string %q", x)
	case json.Number:
		return "number " + x.String()
	case bool:
		return fmt.Sprintf("boolean %v", x)
	}
	return fmt.Sprintf("%T", v)
}

func join(path, field string) string {
	if path == "" {
		return field
	}
	return path + "." + field
}

func deref(p *int) any {
	if p == nil {
		return "-"
	}
	return *p
}

// TestCRDSchemaLoadRefusesWhatItDoesNotCheck: a keyword, format or CEL
// rule the validator does not enforce fails the load, so a CRD cannot
// pass on what was never checked.
func TestCRDSchemaLoadRefusesWhatItDoesNotCheck(t *testing.T) {
	const crd = `spec:
  group: example.com
  names: {kind: Thing}
  versions:
  - name: v1
    served: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, format: int32}
`
	if _, err := loadCRDSchema([]byte(crd), "Thing", "v1", nil); err != nil {
		t.Fatalf("the plain CRD is refused: %v", err)
	}
	for name, tc := range map[string]struct{ from, to, want string }{
		"unknown keyword": {"format: int32}", "format: int32, maxProperties: 3}", `unknown field "maxProperties"`},
		"unknown format":  {"format: int32", "format: uint8", `format "uint8"`},
		"CEL rule":        {"            properties:", "            x-kubernetes-validations: [{rule: 'self.size > 1'}]\n            properties:", "has no Go equivalent"},
		"list type set":   {"size: {type: integer, format: int32}", "size: {type: array, x-kubernetes-list-type: set, items: {type: string}}", `x-kubernetes-list-type "set"`},
		"metadata schema": {"          spec:", "          metadata: {type: object, properties: {name: {type: string}}}\n          spec:", "constrains metadata"},
	} {
		doc := strings.Replace(crd, tc.from, tc.to, 1)
		if doc == crd {
			t.Fatalf("%s: %q is not in the CRD", name, tc.from)
		}
		_, err := loadCRDSchema([]byte(doc), "Thing", "v1", nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: load error %v, want it to say %q", name, err, tc.want)
		}
	}
}
