package events

import (
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// This file holds the package to its promise: every string of the public
// contract is written here once, and everything else names the constant.
// A copy elsewhere drifts the day one side is renamed and the other is
// not, and nothing but a reader notices.

// TestContractStringsAreDefinedOnlyInEvents parses every non-test Go file
// of the module outside events/ and fails on a string literal equal to one
// of events' exported string constants (see contractViolations for the
// rule).
func TestContractStringsAreDefinedOnlyInEvents(t *testing.T) {
	contract := contractValues(t, ".")
	root := moduleRoot(t)
	found, err := contractViolations(root, contract)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range found {
		if contract[v.value] == nil {
			t.Errorf("%s: rule %q is not in events; add it to events/rules.go and use the constant", v.pos, v.value)
			continue
		}
		t.Errorf("%s: %q is events.%s; use the constant", v.pos, v.value, strings.Join(contract[v.value], " or events."))
	}
}

// TestContractValuesCoverEveryExportedStringConstant makes sure the list
// the test above checks against cannot silently shrink: every exported
// constant of string kind resolves to a value, and a few known ones of
// each kind are there.
func TestContractValuesCoverEveryExportedStringConstant(t *testing.T) {
	contract := contractValues(t, ".")
	for value, names := range map[string]string{
		ErrorPrefix:          "ErrorPrefix",
		SubjectControlPrefix: "SubjectControlPrefix",
		SubjectReconvert:     "SubjectReconvert",
		MetaOutput:           "MetaOutput",
		TagCRC64NVME:         "TagCRC64NVME",
		RuleCancelled:        "RuleCancelled",
		ConsumerConvert:      "ConsumerConvert",
		DedupBucket:          "DedupBucket",
		string(StateReady):   "StateReady",
		TypeConverted:        "TypeConverted",
		SourceWatchdog:       "SourceWatchdog",
	} {
		if !slices.Contains(contract[value], names) {
			t.Errorf("contract values lack %s = %q (got %v)", names, value, contract[value])
		}
	}
}

// TestContractViolationsFindsCopies proves the rule on a planted tree: it
// reports distinctive values anywhere, generic words and rules only where
// they name the contract, a refusal's rule even when events lacks it, and
// never test files or events/ itself.
func TestContractViolationsFindsCopies(t *testing.T) {
	root := t.TempDir()
	write := func(rel, src string) {
		t.Helper()
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(src), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("a/a.go", `package a

const marker = "imagepipe-output" // want

type binding struct{ Durable, Rule string }

var (
	b    = binding{Durable: "convert"} // want
	args = []string{"convert", "-p"}   // a qemu-img subcommand, not the function
	word = "cancelled"                 // a word, not at a contract site
	fns  = []string{"ingest", "notify"} // want: a list of functions
)

func f(x binding, c interface{ Consumer(string, string) }) bool {
	c.Consumer("JOBS", "convert") // want twice: the stream and the consumer
	return x.Rule == "cancelled"  // want
}

const (
	cancelledRule    = "cancelled" // want
	OutcomeCancelled = "cancelled" // a runtime outcome, not the rule
)

func g(name string) {
	switch name {
	case "ingest": // want
	case "notify", "other": // want once
	}
	switch name {
	case "convert", "info": // a qemu-img subcommand
	}
}

func h(info map[string]any) {
	_ = info["virtual-size"]           // qemu-img's key, not the rule
	_ = refuse("virtual-size", "", "") // want
	_ = refuse("brand-new", "", "")    // want: a rule events lacks
}
`)
	write("a/a_test.go", "package a\n\nconst inTest = \"imagepipe-output\"\n")
	write("events/e.go", "package events\n\nconst MetaOutput = \"imagepipe-output\"\n")
	contract := map[string][]string{
		"imagepipe-output": {"MetaOutput"}, "convert": {"ConsumerConvert"}, "ingest": {"FunctionIngest"},
		"notify": {"FunctionNotify"}, "cancelled": {"RuleCancelled"}, "JOBS": {"StreamJobs"},
		"virtual-size": {"RuleVirtualSize"},
	}
	found, err := contractViolations(root, contract)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, v := range found {
		got = append(got, fmt.Sprintf("%d:%s", v.pos.Line, v.value))
	}
	want := []string{"3:imagepipe-output", "8:convert", "11:ingest", "11:notify", "15:JOBS", "15:convert", "16:cancelled", "20:cancelled", "26:ingest", "27:notify", "36:virtual-size", "37:brand-new"}
	if !slices.Equal(got, want) {
		t.Errorf("violations = %v, want %v", got, want)
	}
}

// genericWord is the shape of a contract value that is also an ordinary
// word: a function's name (a CLI command, a qemu-img subcommand, a log
// stage), a phase, the cancelled rule (a slog key, a metric label), the
// CloudEvents spec version. Such a literal is a copy of the contract only
// at a site that names the contract (see contractSites); anywhere else it
// is the word.
var genericWord = regexp.MustCompile(`^([a-z]+|[0-9.]+)$`)

// onlyAtSites reports whether value counts only at a contract site: a
// generic word, or a failure rule. Rules are descriptive kebab-case words
// that other vocabularies share: qemu-img's JSON keys ("virtual-size",
// "data-file"), inspect's labels for a header it matched
// ("vmdk-descriptor"), a test image's kind ("backing-file").
func onlyAtSites(value string, names []string) bool {
	return genericWord.MatchString(value) || !slices.ContainsFunc(names, func(n string) bool { return !strings.HasPrefix(n, "Rule") })
}

// contractFields are the struct fields and selectors (in lower case; an
// unexported field counts too) whose value is a contract name: a
// consumer, a failure's rule or phase, a function, a CloudEvents
// attribute.
var contractFields = map[string]bool{
	"durable": true, "rule": true, "phase": true, "function": true,
	"specversion": true, "source": true, "type": true, "stream": true,
}

// contractConstName is the shape of a constant or variable declared to
// hold a contract name of its own, such as a package's cancelledRule,
// ConvertConsumer or a refusal reason that doubles as a rule. Another
// package's outcome that happens to be spelt "cancelled"
// (natsrt.OutcomeCancelled, a runtime state) is not one.
var contractConstName = regexp.MustCompile(`(?i)rule|reason|consumer|durable|phase`)

// consumerCalls are the jetstream calls that name a stream and a consumer.
var consumerCalls = map[string]bool{
	"Consumer": true, "CreateConsumer": true, "UpdateConsumer": true, "CreateOrUpdateConsumer": true,
	"DeleteConsumer": true, "PauseConsumer": true, "ResumeConsumer": true, "OrderedConsumer": true,
}

// failureCalls are the constructors of a refusal, internal/failure's and
// internal/inspect's, with the position of their rule argument.
var failureCalls = map[string]int{"Refused": 1, "refuse": 0}

type violation struct {
	pos   token.Position
	value string
}

// contractViolations lists, in file and line order, the string literals
// under root (outside events/, testdata/ and _test.go files) that copy a
// contract value. A distinctive value is a copy wherever it appears; a
// generic word or a rule only at a contract site.
func contractViolations(root string, contract map[string][]string) ([]violation, error) {
	var found []violation
	fset := token.NewFileSet()
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			name := d.Name()
			rel, _ := filepath.Rel(root, path)
			if rel == "events" || name == "testdata" || name == "vendor" || (path != root && strings.HasPrefix(name, ".")) {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			return err
		}
		found = append(found, fileViolations(fset, f, contract)...)
		return nil
	})
	sort.SliceStable(found, func(i, j int) bool {
		a, b := found[i].pos, found[j].pos
		if a.Filename != b.Filename {
			return a.Filename < b.Filename
		}
		return a.Offset < b.Offset
	})
	return found, err
}

func fileViolations(fset *token.FileSet, f *ast.File, contract map[string][]string) []violation {
	sites, rules := contractSites(f, contract)
	var found []violation
	ast.Inspect(f, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.ImportSpec:
			return false // a path, never a contract value
		case *ast.Field:
			// Only the tag can hold a literal, and a tag such as
			// `json:"cancelled"` names a JSON field.
			return false
		case *ast.BasicLit:
			s, ok := stringValue(n)
			if ok && rules[n] {
				// A rule is named by its constant, even one that
				// events does not have yet.
				found = append(found, violation{fset.Position(n.Pos()), s})
				return true
			}
			if !ok || contract[s] == nil {
				return true
			}
			if !onlyAtSites(s, contract[s]) || sites[n] {
				found = append(found, violation{fset.Position(n.Pos()), s})
			}
		}
		return true
	})
	return found
}

// contractSites are the literals of f that stand where the contract is
// named: the value of a contractFields field, one side of a comparison
// with such a selector, an argument of a consumerCalls or failureCalls
// call, the value of a contractConstName declaration, and an element of a
// string list or a case of a switch naming two or more functions. rules
// are the literals that stand for a failure rule: a Rule field's value
// and a refusal's rule argument, whatever they say.
func contractSites(f *ast.File, contract map[string][]string) (sites, rules map[*ast.BasicLit]bool) {
	sites, rules = map[*ast.BasicLit]bool{}, map[*ast.BasicLit]bool{}
	mark := func(e ast.Expr) {
		if lit, ok := ast.Unparen(e).(*ast.BasicLit); ok {
			sites[lit] = true
		}
	}
	markRule := func(e ast.Expr) {
		if lit, ok := ast.Unparen(e).(*ast.BasicLit); ok && lit.Kind == token.STRING {
			rules[lit] = true
		}
	}
	ast.Inspect(f, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.KeyValueExpr:
			if id, ok := n.Key.(*ast.Ident); ok && contractFields[strings.ToLower(id.Name)] {
				mark(n.Value)
				if id.Name == "Rule" {
					markRule(n.Value)
				}
			}
		case *ast.ValueSpec:
			for i, name := range n.Names {
				if i < len(n.Values) && contractConstName.MatchString(name.Name) {
					mark(n.Values[i])
				}
			}
		case *ast.BinaryExpr:
			if n.Op == token.EQL || n.Op == token.NEQ {
				if isContractSelector(n.X) {
					mark(n.Y)
				}
				if isContractSelector(n.Y) {
					mark(n.X)
				}
			}
		case *ast.CallExpr:
			var callee string
			switch fun := n.Fun.(type) {
			case *ast.SelectorExpr:
				callee = fun.Sel.Name
			case *ast.Ident:
				callee = fun.Name
			}
			ruleArg, refusal := failureCalls[callee]
			if consumerCalls[callee] || refusal {
				for _, a := range n.Args {
					mark(a)
				}
			}
			if refusal && ruleArg < len(n.Args) {
				markRule(n.Args[ruleArg])
			}
		case *ast.CompositeLit:
			markFunctionList(sites, contract, n.Elts)
		case *ast.SwitchStmt:
			var cases []ast.Expr
			for _, c := range n.Body.List {
				cases = append(cases, c.(*ast.CaseClause).List...)
			}
			markFunctionList(sites, contract, cases)
		}
		return true
	})
	return sites, rules
}

// markFunctionList marks the function names among exprs when there are
// two or more: a list of functions, or a switch over them, is the
// contract's list however short its words.
func markFunctionList(sites map[*ast.BasicLit]bool, contract map[string][]string, exprs []ast.Expr) {
	var functions []*ast.BasicLit
	for _, e := range exprs {
		if lit, ok := e.(*ast.BasicLit); ok {
			if s, ok := stringValue(lit); ok && slices.ContainsFunc(contract[s], isFunctionName) {
				functions = append(functions, lit)
			}
		}
	}
	if len(functions) >= 2 {
		for _, lit := range functions {
			sites[lit] = true
		}
	}
}

func isContractSelector(e ast.Expr) bool {
	sel, ok := ast.Unparen(e).(*ast.SelectorExpr)
	return ok && contractFields[strings.ToLower(sel.Sel.Name)]
}

func isFunctionName(name string) bool {
	return strings.HasPrefix(name, "Function") || strings.HasPrefix(name, "Consumer")
}

func stringValue(lit *ast.BasicLit) (string, bool) {
	if lit.Kind != token.STRING {
		return "", false
	}
	s, err := strconv.Unquote(lit.Value)
	return s, err == nil
}

// contractValues maps each value of an exported string constant of the
// package in dir (its non-test files) to the constants' names. It
// evaluates the constant expressions this package uses (literals, other
// constants, concatenation, conversions to a named string type) and fails
// on one it cannot, so that no constant drops out of the check unseen.
func contractValues(t *testing.T, dir string) map[string][]string {
	t.Helper()
	fset := token.NewFileSet()
	exprs := map[string]ast.Expr{}
	var exported []string
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".go") || strings.HasSuffix(e.Name(), "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, filepath.Join(dir, e.Name()), nil, parser.SkipObjectResolution)
		if err != nil {
			t.Fatal(err)
		}
		for _, decl := range f.Decls {
			gd, ok := decl.(*ast.GenDecl)
			if !ok || gd.Tok != token.CONST {
				continue
			}
			for _, spec := range gd.Specs {
				vs := spec.(*ast.ValueSpec)
				for i, name := range vs.Names {
					if i < len(vs.Values) {
						exprs[name.Name] = vs.Values[i]
						if name.IsExported() {
							exported = append(exported, name.Name)
						}
					}
				}
			}
		}
	}
	out := map[string][]string{}
	for _, name := range exported {
		v, err := evalString(exprs, exprs[name])
		if errors.Is(err, errNotString) {
			continue
		}
		if err != nil {
			t.Fatalf("constant %s: %v", name, err)
		}
		out[v] = append(out[v], name)
	}
	return out
}

var errNotString = errors.New("not a string constant")

func evalString(consts map[string]ast.Expr, e ast.Expr) (string, error) {
	switch e := ast.Unparen(e).(type) {
	case *ast.BasicLit:
		if e.Kind != token.STRING {
			return "", errNotString
		}
		return strconv.Unquote(e.Value)
	case *ast.Ident:
		if def, ok := consts[e.Name]; ok {
			return evalString(consts, def)
		}
		return "", fmt.Errorf("cannot evaluate identifier %s", e.Name)
	case *ast.BinaryExpr:
		if e.Op != token.ADD {
			return "", errNotString
		}
		x, err := evalString(consts, e.X)
		if err != nil {
			return "", err
		}
		y, err := evalString(consts, e.Y)
		return x + y, err
	case *ast.CallExpr:
		if len(e.Args) == 1 {
			return evalString(consts, e.Args[0])
		}
	}
	return "", fmt.Errorf("cannot evaluate %T", e)
}

func moduleRoot(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs(".")
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the events package")
		}
		dir = parent
	}
}
