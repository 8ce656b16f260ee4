package main

import (
	"bufio"
	"os"
	"os/exec"
	"path"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// The README's code layout table is the house's plan: every package of the
// module has a row, and no package imports another of the module that its
// row does not allow. A new package, or a new import across the layers,
// fails here until the table says where it belongs.
func TestREADMECodeLayoutNamesEveryPackageAndWhatItMayImport(t *testing.T) {
	rows := readLayoutTable(t, "../../README.md")
	out, err := exec.Command("go", "list", "-f", "{{.ImportPath}} {{join .Imports \" \"}}", "github.com/imagepipe/imagepipe/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	const module = "github.com/imagepipe/imagepipe/"
	for line := range strings.Lines(string(out)) {
		fields := strings.Fields(line)
		pkg := strings.TrimPrefix(fields[0], module)
		allowed, ok := rows[pkg]
		if !ok {
			t.Errorf("package %s has no row in the README's code layout table", pkg)
			continue
		}
		if allowed == nil { // anything
			continue
		}
		for _, imp := range fields[1:] {
			if !strings.HasPrefix(imp, module) {
				continue
			}
			imp = strings.TrimPrefix(imp, module)
			if !slices.ContainsFunc(allowed, func(a string) bool { ok, _ := path.Match(a, imp); return ok }) {
				t.Errorf("%s imports %s, which its row in the README's code layout table does not allow (%s)", pkg, imp, strings.Join(allowed, ", "))
			}
		}
	}
}

var backticked = regexp.MustCompile("`([^`]+)`")

// readLayoutTable maps each package named in the table's first column to
// the module packages its third column allows (patterns such as
// internal/*); nil means anything.
func readLayoutTable(t *testing.T, readme string) map[string][]string {
	t.Helper()
	f, err := os.Open(readme)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rows := map[string][]string{}
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "## Code layout":
			in = true
			continue
		case in && strings.HasPrefix(line, "## "):
			in = false
		}
		if !in || !strings.HasPrefix(line, "| `") {
			continue
		}
		cols := strings.Split(line, " | ")
		if len(cols) != 3 {
			t.Fatalf("code layout row %q: want 3 columns", line)
		}
		var allowed []string
		switch may := cols[2]; {
		case strings.HasPrefix(may, "anything"), strings.HasPrefix(may, "everything"):
			allowed = nil
		default:
			allowed = []string{}
			for _, m := range backticked.FindAllStringSubmatch(may, -1) {
				allowed = append(allowed, m[1])
			}
		}
		for _, m := range backticked.FindAllStringSubmatch(cols[0], -1) {
			rows[m[1]] = allowed
		}
	}
	if len(rows) == 0 {
		t.Fatal("the README has no code layout table")
	}
	return rows
}
