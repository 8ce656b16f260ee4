package main

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/imagepipe/imagepipe/internal/config"
)

// logSettings are how every process logs.
type logSettings struct {
	Level  string `env:"IMAGEPIPE_LOG_LEVEL" envDefault:"info" takes:"debug, info, warn or error" doc:"the least severe log records written"`
	Format string `env:"IMAGEPIPE_LOG_FORMAT" envDefault:"text" takes:"text or json" doc:"text (logfmt) or one JSON object a line"`
}

// Validate refuses a level or format the logger would otherwise quietly
// replace with its default.
func (l logSettings) Validate() error {
	var problems []error
	if _, err := parseLogLevel(l.Level); err != nil {
		problems = append(problems, err)
	}
	if _, err := parseLogFormat(l.Format); err != nil {
		problems = append(problems, err)
	}
	return errors.Join(problems...)
}

// parseLogLevel reads IMAGEPIPE_LOG_LEVEL: debug, info, warn or error, in
// any case; empty is info.
func parseLogLevel(s string) (slog.Level, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "debug":
		return slog.LevelDebug, nil
	case "", "info":
		return slog.LevelInfo, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return slog.LevelInfo, config.Invalid("IMAGEPIPE_LOG_LEVEL", s, "want debug, info, warn or error")
}

// parseLogFormat reads IMAGEPIPE_LOG_FORMAT: text or json; empty is text.
// It returns whether the format is JSON.
func parseLogFormat(s string) (json bool, err error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "text":
		return false, nil
	case "json":
		return true, nil
	}
	return false, config.Invalid("IMAGEPIPE_LOG_FORMAT", s, "want text or json")
}

// runConfigCheck prints the configuration the named function (ingest,
// convert, notify, or all of them) would run with: every variable it
// reads, its value with secrets masked, and whether it was set or is the
// default. It returns an error listing every problem, and contacts
// nothing.
func runConfigCheck(w io.Writer, function string) error {
	if function == "" {
		function = "all"
	}
	var s settings
	parts, _, err := s.functionParts(function)
	if err != nil {
		return usageError{err.Error()}
	}
	_, loadErr := loadFunctionSettings(function)
	environ := config.Environ()
	vars := uniqueVars(parts)

	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VARIABLE\tVALUE\tFROM")
	for _, v := range vars {
		value, from := effective(v, environ)
		fmt.Fprintf(tw, "%s\t%s\t%s\n", v.Name, value, from)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if unknown := unknownVars(environ); len(unknown) > 0 {
		fmt.Fprintf(w, "\nset but read by no function (a typo?): %s\n", strings.Join(unknown, ", "))
	}
	if loadErr != nil {
		return loadErr
	}
	fmt.Fprintf(w, "\nconfiguration of %s: no problems found\n", function)
	return nil
}

// effective is what a variable is set to, as it may be shown, and where
// the value comes from.
func effective(v config.Var, environ map[string]string) (value, from string) {
	raw, set := environ[v.Name]
	switch {
	case set && raw != "":
		return withBytes(v, config.Shown(v, raw)), "set"
	case v.HasDefault && v.Default != "":
		return withBytes(v, config.Shown(v, v.Default)), "default"
	}
	if v.FileFor != "" && environ[v.FileFor] != "" {
		return "-", "unset (" + v.FileFor + " is set)"
	}
	return "-", "unset"
}

// withBytes spells a size out both ways, "1G (1000000000 bytes)" or
// "1073741824 (1GiB)", so that no one need guess which G it was.
func withBytes(v config.Var, value string) string {
	if v.Type != reflect.TypeOf(int64(0)) {
		return value
	}
	n, err := config.ParseSize(value)
	if err != nil || n <= 0 {
		return value
	}
	if strconv.FormatInt(n, 10) != strings.TrimSpace(value) {
		return fmt.Sprintf("%s (%d bytes)", value, n)
	}
	if f := config.FormatSize(n); f != value {
		return fmt.Sprintf("%s (%s)", value, f)
	}
	return value
}

// uniqueVars lists the variables of parts once each, in the order the
// structs declare them: ingest and convert both read
// IMAGEPIPE_OUTPUT_BUCKET, for one.
func uniqueVars(parts []any) []config.Var {
	var out []config.Var
	seen := map[string]bool{}
	for _, p := range parts {
		for _, v := range config.Vars(p) {
			if !seen[v.Name] {
				seen[v.Name] = true
				out = append(out, v)
			}
		}
	}
	return out
}

// notSettings are IMAGEPIPE_* variables that are no function's setting:
// compose.yaml's address to publish ports on, and the tests' own.
var notSettings = []string{"IMAGEPIPE_BIND", "IMAGEPIPE_TEST_"}

// unknownVars are the IMAGEPIPE_* variables in environ that no function
// reads.
func unknownVars(environ map[string]string) []string {
	var s settings
	known := map[string]bool{}
	for _, v := range uniqueVars(s.allParts()) {
		known[v.Name] = true
	}
	var out []string
	for _, k := range slices.Sorted(maps.Keys(environ)) {
		if strings.HasPrefix(k, "IMAGEPIPE_") && !known[k] && !slices.ContainsFunc(notSettings, func(p string) bool { return strings.HasPrefix(k, p) }) {
			out = append(out, k)
		}
	}
	return out
}

// The README's configuration reference lies between these markers; the
// table between them is configTable's, and a test holds it so.
const (
	configTableBegin = "<!-- configuration table: generated from the config structs by `go test ./cmd/imagepipe -run TestREADMEConfigurationTable -update`; do not edit -->"
	configTableEnd   = "<!-- end of configuration table -->"
)

// configTable is the README's configuration reference, made from the
// configuration structs' tags so that it cannot drift from them.
func configTable() string {
	var s settings
	readBy := map[string][]string{}
	for _, fn := range functionNames {
		parts, _, _ := s.functionParts(fn)
		for _, v := range uniqueVars(parts) {
			readBy[v.Name] = append(readBy[v.Name], fn)
		}
	}
	var b strings.Builder
	b.WriteString("| variable | default | takes | read by | meaning |\n| --- | --- | --- | --- | --- |\n")
	for _, v := range uniqueVars(s.allParts()) {
		fmt.Fprintf(&b, "| `%s` | %s | %s | %s | %s |\n", v.Name, tableDefault(v), tableTakes(v),
			strings.Join(readBy[v.Name], ", "), markVariables(v.Doc))
	}
	return b.String()
}

func tableDefault(v config.Var) string {
	switch {
	case !v.HasDefault || v.Default == "":
		return "none"
	case v.Type == reflect.TypeOf(int64(0)):
		n, err := config.ParseSize(v.Default)
		if err == nil && config.FormatSize(n) != v.Default && n > 0 {
			return "`" + v.Default + "` (" + config.FormatSize(n) + ")"
		}
	}
	return "`" + v.Default + "`"
}

func tableTakes(v config.Var) string {
	switch {
	case v.Takes != "":
		return v.Takes
	case v.File:
		return "a file's path"
	case v.Secrecy == config.Secret:
		return "a secret; also from `" + v.Name + "_FILE`"
	}
	if a := config.Accepts(v.Type); a != "" {
		return a
	}
	return "text"
}

var variableName = regexp.MustCompile(`\bIMAGEPIPE_[A-Z0-9_]+\b`)

// markVariables sets variable names in code type, and keeps a | from
// ending the cell.
func markVariables(doc string) string {
	return variableName.ReplaceAllString(strings.ReplaceAll(doc, "|", `\|`), "`$0`")
}
