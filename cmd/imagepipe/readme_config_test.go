package main

import (
	"flag"
	"os"
	"strings"
	"testing"

	"github.com/imagepipe/imagepipe/internal/config"
)

var updateREADME = flag.Bool("update", false, "rewrite README.md's configuration table from the config structs")

const readmePath = "../../README.md"

func TestREADMEConfigurationTableIsGenerated(t *testing.T) {
	b, err := os.ReadFile(readmePath)
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	begin := strings.Index(readme, configTableBegin)
	end := strings.Index(readme, configTableEnd)
	if begin < 0 || end < begin {
		t.Fatalf("README.md lacks the markers %q and %q around its configuration table", configTableBegin, configTableEnd)
	}
	head, current, tail := readme[:begin+len(configTableBegin)], readme[begin+len(configTableBegin):end], readme[end:]
	want := "\n\n" + configTable() + "\n"
	if current == want {
		return
	}
	if *updateREADME {
		if err := os.WriteFile(readmePath, []byte(head+want+tail), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Errorf("README.md's configuration table is stale; run\n\tgo test ./cmd/imagepipe -run TestREADMEConfigurationTable -update\nto regenerate it. Differences:\n%s", lineDiff(current, want))
}

// lineDiff lists the lines only one of the two texts has.
func lineDiff(got, want string) string {
	in := func(s string) map[string]bool {
		m := map[string]bool{}
		for _, l := range strings.Split(s, "\n") {
			m[l] = true
		}
		return m
	}
	g, w := in(got), in(want)
	var b strings.Builder
	for _, l := range strings.Split(got, "\n") {
		if !w[l] {
			b.WriteString("- " + l + "\n")
		}
	}
	for _, l := range strings.Split(want, "\n") {
		if !g[l] {
			b.WriteString("+ " + l + "\n")
		}
	}
	return b.String()
}

func TestEveryVariableIsDocumented(t *testing.T) {
	var s settings
	for _, v := range uniqueVars(s.allParts()) {
		if v.Doc == "" {
			t.Errorf("%s (%s) has no doc tag: the README's table says nothing of it", v.Name, v.Field)
		}
	}
}

// A variable two functions read is one setting: both read it with the
// same default and describe it alike.
func TestSharedVariablesAgreeAcrossFunctions(t *testing.T) {
	seen := map[string]config.Var{}
	for _, fn := range append(functionNames, "all") {
		var s settings
		parts, _, err := s.functionParts(fn)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range parts {
			for _, v := range config.Vars(p) {
				if w, ok := seen[v.Name]; ok && (w.Default != v.Default || w.HasDefault != v.HasDefault || w.Doc != v.Doc || w.Type != v.Type) {
					t.Errorf("%s is %s %q (%q) in %s but %s %q (%q) in %s", v.Name, w.Type, w.Default, w.Doc, w.Field, v.Type, v.Default, v.Doc, v.Field)
				}
				seen[v.Name] = v
			}
		}
	}
}
