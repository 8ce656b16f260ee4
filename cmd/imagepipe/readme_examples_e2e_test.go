package main

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// The README's examples are commands an operator copies. This file runs
// every one of them against the e2e stack (the same wiring as `imagepipe
// dev`), in README order, so an example that no longer parses, names a
// flag that is gone, or fails against a running system breaks the build.
//
// The rule: in every ```sh block, a line (with its \ continuations) whose
// command is `imagepipe` or `go run ./cmd/imagepipe`, after optional
// VAR=value assignments, is an example. It runs as written through run(),
// with three differences an operator's shell would not see:
//
//   - the environment is the stack's (stackEnv), standing in for the
//     exports of "Trying it" and the deployment's env files;
//   - the working directory is a temporary one holding the local files the
//     examples name (win11.vhdx), made by qemu-img;
//   - every key under disks/ is put under a prefix of this run, so that
//     -count=N and other tests never see one run's images in another.
//
// A command that follows until interrupted (watch) runs in the background
// while the later examples run, and is interrupted once it has printed a
// change they made.
//
// Examples that cannot run here are left out by readmeNotRun, each with
// its reason; the test fails if a rule there matches nothing, so the list
// cannot outlive the examples it excuses.

// readmeExample is one runnable command line of the README.
type readmeExample struct {
	line    int    // 1-based line in README.md
	section string // the nearest heading above it
	text    string // as an operator types it: imagepipe ARGS, without VAR=value words or the comment
	env     map[string]string
	args    []string // after "imagepipe"
}

// readmeNotRun names the examples that need what a test cannot have.
var readmeNotRun = []struct {
	why   string
	match func(e readmeExample) bool
}{
	{"needs a Kubernetes cluster with port-forwards, and runs from it (test/cluster and deploy/kubernetes cover it)",
		func(e readmeExample) bool { return e.section == "Running on Kubernetes" }},
	{"fetches a file from the internet (example.com); import_e2e_test.go imports from a loopback server",
		func(e readmeExample) bool { return e.args[0] == "import" }},
	{"asks for three stream replicas, which needs a three-node cluster (test/cluster runs it)",
		func(e readmeExample) bool { return e.args[0] == "setup" && e.env["IMAGEPIPE_STREAM_REPLICAS"] == "3" }},
}

// readmeExitCode is the exit code the README gives an example other than
// 0, by the command as written, and what its one line on stderr says.
var readmeExitCode = map[string]struct {
	code   int
	stderr string
}{
	// The instance id is an illustration; the README says ctl exits 1
	// when no replica with it answers.
	"imagepipe ctl drain --instance NDWsUwoEz3u4Ad5oRaZ0Wv": {1, `no replica with instance id "NDWsUwoEz3u4Ad5oRaZ0Wv" answered`},
	"imagepipe ctl stop --instance NDWsUwoEz3u4Ad5oRaZ0Wv":  {1, `no replica with instance id "NDWsUwoEz3u4Ad5oRaZ0Wv" answered`},
	// "Trying it" converted win11.vhdx before; the README says cancel
	// exits 1 for an image already finished.
	"imagepipe ctl cancel uploads/disks/win11.vhdx": {1, "nothing to cancel"},
}

func TestEveryREADMEExampleRunsAgainstTheDevStack(t *testing.T) {
	examples := readmeExamples(t, readmeFile)
	stackEnv(t)
	// ctl --instance waits four connect timeouts for a replica that never
	// answers; a shorter one keeps the two illustrative ids quick.
	t.Setenv("IMAGEPIPE_CONNECT_TIMEOUT", "3s")
	// An example pauses convert and the next resumes it; should the test
	// stop between them, the stack must not stay paused for the others.
	t.Cleanup(func() { imagepipe(t, "ctl", "resume", "--function", "convert") })

	dir := t.TempDir()
	run := fmt.Sprintf("e2e/readme/%d/", time.Now().UnixNano())
	// win11.vhdx of "Trying it": a real VHDX of content no other run has,
	// so it is converted, not found a duplicate.
	makeImage(t, dir, "win11.vhdx", "vhdx", fmt.Sprintf("write -P %d %dk 64k", 1+time.Now().UnixNano()%250, 64*(time.Now().UnixNano()%512)))
	t.Chdir(dir)

	excused := make([]int, len(readmeNotRun))
	used := map[string]bool{}
	var live []liveExample
	ran := 0
	for _, e := range examples {
		if i := notRun(e); i >= 0 {
			excused[i]++
			t.Logf("README.md:%d not run (%s): %s", e.line, readmeNotRun[i].why, e.text)
			continue
		}
		want, c := 0, readmeExitCode[e.text]
		if c.code != 0 {
			want = c.code
			used[e.text] = true
		}
		if e.args[0] == "watch" {
			// It follows until interrupted: it runs beside the examples
			// after it, which change this run's image, and is stopped
			// once it has printed that.
			live = append(live, liveExample{e, startCLI(t, underRun(e.args, run)...)})
			ran++
			continue
		}
		res := withEnv(t, e.env, func() cmdResult { return imagepipe(t, underRun(e.args, run)...) })
		ran++
		if res.code != want {
			t.Errorf("README.md:%d (%s): %s\nexited %d, want %d\nstdout:\n%s\nstderr:\n%s", e.line, e.section, e.text, res.code, want, res.stdout, res.stderr)
			continue
		}
		if !strings.Contains(res.stderr, c.stderr) {
			t.Errorf("README.md:%d: %s: stderr %q, want it to say %q", e.line, e.text, res.stderr, c.stderr)
		}
		t.Logf("README.md:%d ran: %s (exit %d)", e.line, e.text, res.code)
		checkDocumentedOutput(t, e, res)
	}
	for i, n := range excused {
		if n == 0 {
			t.Errorf("readmeNotRun rule %q matches no example: remove it", readmeNotRun[i].why)
		}
	}
	for _, l := range live {
		// The re-convert examples move this run's image through its states.
		l.cmd.until(t, run+"disks/win11.vhdx")
		l.cmd.cancel()
		if code := l.cmd.exit(t); code != 0 {
			t.Errorf("README.md:%d: %s exited %d when interrupted, want 0\n%s", l.line, l.text, code, l.cmd.stderr)
		}
	}
	for text := range readmeExitCode {
		if !used[text] {
			t.Errorf("readmeExitCode names %q, which the README no longer has", text)
		}
	}
	// The README has some twenty runnable examples; far fewer means the
	// extraction broke, not that the README shrank.
	if ran < 15 {
		t.Errorf("ran %d README examples, want at least 15: is the extraction rule still right?", ran)
	}
}

// liveExample is a command that runs until interrupted.
type liveExample struct {
	readmeExample
	cmd *cliRun
}

// withEnv runs f with the example's own VAR=value words set, as the shell
// sets them for that one command, and puts the environment back after.
func withEnv(t *testing.T, env map[string]string, f func() cmdResult) cmdResult {
	t.Helper()
	for k, v := range env {
		old, had := os.LookupEnv(k)
		t.Setenv(k, v)
		defer func() {
			if had {
				os.Setenv(k, old)
			} else {
				os.Unsetenv(k)
			}
		}()
	}
	return f()
}

func notRun(e readmeExample) int {
	for i, r := range readmeNotRun {
		if r.match(e) {
			return i
		}
	}
	return -1
}

// underRun puts every disks/ key of an example under this run's prefix.
func underRun(args []string, run string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		switch {
		case strings.HasPrefix(a, "disks/"):
			out[i] = run + a
		case strings.Contains(a, "/disks/"):
			out[i] = strings.Replace(a, "/disks/", "/"+run+"disks/", 1)
		default:
			out[i] = a
		}
	}
	return out
}

// checkDocumentedOutput holds the README's sample outputs to what the
// commands print now, where the README shows one.
func checkDocumentedOutput(t *testing.T, e readmeExample, res cmdResult) {
	t.Helper()
	switch {
	case len(e.args) == 2 && e.args[0] == "status" && !strings.HasPrefix(e.args[1], "-"):
		// "`imagepipe status` prints:" and a READY image's fields.
		doc := readmeBlockAfter(t, "`imagepipe status` prints:")
		if got, want := fieldLabels(res.stdout), fieldLabels(doc); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("README.md:%d: imagepipe status prints the fields %v, the README shows %v", e.line, got, want)
		}
	case len(e.args) == 2 && e.args[0] == "ctl" && e.args[1] == "status":
		doc := readmeBlockAfter(t, "imagepipe ctl cancel uploads/disks/win11.vhdx")
		if got, want := strings.Fields(firstLine(res.stdout)), strings.Fields(firstLine(doc)); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("README.md:%d: imagepipe ctl status prints the header %v, the README shows %v", e.line, got, want)
		}
	}
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

// fieldLabels are the first words of the indented lines of `status`.
func fieldLabels(s string) []string {
	var labels []string
	for _, line := range strings.Split(s, "\n") {
		if strings.HasPrefix(line, "  ") {
			labels = append(labels, strings.Fields(line)[0])
		}
	}
	return labels
}

// readmeBlockAfter is the first plain fenced block (no language) after
// the line holding marker: the sample output the README shows for it. A
// marker inside a block (an example) looks past that block's end.
func readmeBlockAfter(t *testing.T, marker string) string {
	t.Helper()
	b, err := os.ReadFile(readmeFile)
	if err != nil {
		t.Fatal(err)
	}
	before, rest, ok := strings.Cut(string(b), marker)
	if !ok {
		t.Fatalf("README.md has no %q", marker)
	}
	inBlock := false
	for _, line := range strings.Split(before, "\n") {
		if strings.HasPrefix(line, "```") {
			inBlock = !inBlock
		}
	}
	lines := strings.Split(rest, "\n")
	for i, line := range lines {
		if !strings.HasPrefix(line, "```") {
			continue
		}
		if inBlock {
			inBlock = false
			continue
		}
		if line != "```" {
			t.Fatalf("README.md: the block after %q is %s, not a sample output", marker, line)
		}
		var block []string
		for _, l := range lines[i+1:] {
			if strings.HasPrefix(l, "```") {
				return strings.Join(block, "\n")
			}
			block = append(block, l)
		}
	}
	t.Fatalf("README.md: no fenced block after %q", marker)
	return ""
}

var (
	// readmeFile is absolute: the test changes into a directory of its own.
	readmeFile, _ = filepath.Abs(filepath.Join("..", "..", "README.md"))
	readmeHeading = regexp.MustCompile(`^#{2,4} (.+)$`)
	envAssignment = regexp.MustCompile(`^[A-Z_][A-Z0-9_]*$`)
)

// readmeExamples extracts the runnable examples from the README.
func readmeExamples(t *testing.T, path string) []readmeExample {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var (
		examples []readmeExample
		section  string
		fence    string // the open block's language; "" outside one
		inFence  bool
		pending  string
		start    int
	)
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if strings.HasPrefix(line, "```") {
			inFence, fence = !inFence, strings.TrimSpace(strings.TrimPrefix(line, "```"))
			pending = ""
			continue
		}
		if !inFence {
			if m := readmeHeading.FindStringSubmatch(line); m != nil {
				section = strings.ReplaceAll(m[1], "`", "")
			}
			continue
		}
		if fence != "sh" {
			continue
		}
		if pending == "" {
			start = n
		}
		if strings.HasSuffix(line, `\`) {
			pending += strings.TrimSuffix(line, `\`) + " "
			continue
		}
		text := strings.TrimSpace(pending + line)
		pending = ""
		if e, ok := parseExample(t, text); ok {
			e.line, e.section = start, section
			examples = append(examples, e)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return examples
}

// parseExample reads one shell line as a command: VAR=value words, then
// imagepipe (or go run ./cmd/imagepipe) and its arguments; a comment ends
// it. Anything else is not an imagepipe example.
func parseExample(t *testing.T, text string) (readmeExample, bool) {
	words, syntax, err := shellWords(text)
	if err != nil {
		t.Fatalf("README: %q: %v", text, err)
	}
	env := map[string]string{}
	for len(words) > 0 {
		k, v, ok := strings.Cut(words[0], "=")
		if !ok || !envAssignment.MatchString(k) {
			break
		}
		env[k], words = v, words[1:]
	}
	switch {
	case len(words) > 1 && words[0] == "imagepipe":
		words = words[1:]
	case len(words) > 3 && words[0] == "go" && words[1] == "run" && words[2] == "./cmd/imagepipe":
		words = words[3:]
	default:
		return readmeExample{}, false
	}
	if syntax != 0 {
		t.Fatalf("README: %q uses %q, shell syntax this test does not run: write the example as one plain command", text, syntax)
	}
	// Named as imagepipe ..., whichever way of running it the line shows.
	return readmeExample{text: "imagepipe " + strings.Join(words, " "), env: env, args: words}, true
}

// shellWords splits a line as sh would for these examples: blanks
// separate words, single and double quotes group, a word starting with #
// begins a comment. It stops at a pipe, a redirection, a substitution or
// a list, and returns that character: other lines of a block use them,
// imagepipe examples may not.
func shellWords(s string) (words []string, syntax rune, err error) {
	var (
		cur    strings.Builder
		inWord bool
		quote  rune
	)
	for _, r := range s {
		switch {
		case quote != 0:
			if r == quote {
				quote = 0
			} else {
				cur.WriteRune(r)
			}
		case r == '\'' || r == '"':
			quote, inWord = r, true
		case r == ' ' || r == '\t':
			if inWord {
				words, inWord = append(words, cur.String()), false
				cur.Reset()
			}
		case r == '#' && !inWord:
			return words, 0, nil
		case strings.ContainsRune("|;&<>`$(", r):
			return words, r, nil
		default:
			cur.WriteRune(r)
			inWord = true
		}
	}
	if quote != 0 {
		return nil, 0, fmt.Errorf("unterminated %c quote", quote)
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words, 0, nil
}
