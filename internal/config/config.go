package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/caarlos0/env/v11"
)

// Secrecy says how much of a variable's value may be shown.
type Secrecy int

const (
	// Public values are shown as they are.
	Public Secrecy = iota
	// Secret values are never shown; tag `secret:"true"`.
	Secret
	// UserinfoSecret values are URLs, or comma-separated lists of them,
	// shown with any user and password redacted; tag `secret:"url"`.
	UserinfoSecret
)

// Var is one environment variable of a configuration struct, as its tags
// describe it: `env:"NAME[,file]"`, `envDefault:"..."`, `secret:"true"`
// or `secret:"url"`, and `doc:"..."`, the README's description.
type Var struct {
	Name       string
	Field      string // the Go field path, such as Dedup.MaxAge
	Default    string
	HasDefault bool
	// File is set when the variable names a file whose content is the
	// setting (env's ",file", and every <VAR>_FILE).
	File bool
	// FileFor is, for a <VAR>_FILE that Vars adds beside a secret, the
	// secret's variable.
	FileFor string
	Secrecy Secrecy
	Doc     string
	// Takes says what the variable takes where its type does not, such
	// as "raw or qcow2" for a string; tag `takes:"..."`.
	Takes string
	Type  reflect.Type
}

// Vars lists the variables of part, a pointer to a configuration struct,
// nested structs included. Every secret without a <VAR>_FILE of its own
// gets one, which Load reads.
func Vars(part any) []Var {
	t := reflect.TypeOf(part)
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	vars := walk(t, "")
	have := map[string]bool{}
	for _, v := range vars {
		have[v.Name] = true
	}
	for _, v := range vars {
		if v.Secrecy == Secret && !v.File && !have[v.Name+"_FILE"] {
			vars = append(vars, Var{
				Name: v.Name + "_FILE", Field: v.Field, File: true, FileFor: v.Name, Type: reflect.TypeOf(""),
				Doc: "a file holding " + v.Name + " (a mounted Docker or Kubernetes secret; a trailing newline is ignored); set one or the other",
			})
		}
	}
	return vars
}

func walk(t reflect.Type, prefix string) []Var {
	var out []Var
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		tag, ok := f.Tag.Lookup("env")
		if !ok {
			if f.Type.Kind() == reflect.Struct {
				out = append(out, walk(f.Type, prefix+f.Name+".")...)
			}
			continue
		}
		name, opts, _ := strings.Cut(tag, ",")
		def, hasDef := f.Tag.Lookup("envDefault")
		v := Var{
			Name: name, Field: prefix + f.Name, Default: def, HasDefault: hasDef,
			File: strings.Contains(","+opts+",", ",file,"), Doc: f.Tag.Get("doc"), Takes: f.Tag.Get("takes"), Type: f.Type,
		}
		switch f.Tag.Get("secret") {
		case "true":
			v.Secrecy = Secret
		case "url":
			v.Secrecy = UserinfoSecret
		}
		out = append(out, v)
	}
	return out
}

// Environ is the process environment as Load takes it.
func Environ() map[string]string {
	m := map[string]string{}
	for _, kv := range os.Environ() {
		if k, v, ok := strings.Cut(kv, "="); ok {
			m[k] = v
		}
	}
	return m
}

// Validator is a configuration struct that checks what parsing cannot:
// enumerations, ranges, settings that go together. Load calls it. Its
// problems should be *Error (Invalid, InvalidSecret) where one variable
// is at fault, joined with errors.Join when there are several.
type Validator interface {
	Validate() error
}

// Load parses environ into each part, a pointer to a configuration
// struct, and validates it. It returns every problem, not the first, each
// naming its variable; nil when there is none. It contacts nothing.
func Load(environ map[string]string, parts ...any) error {
	var problems []error
	seen := map[string]bool{}
	for _, p := range parts {
		// Parts that share a variable (both ingest and convert read
		// IMAGEPIPE_OUTPUT_BUCKET) report its problem once.
		for _, e := range loadPart(environ, p) {
			if !seen[e.Error()] {
				seen[e.Error()] = true
				problems = append(problems, e)
			}
		}
	}
	if len(problems) == 0 {
		return nil
	}
	return &Problems{List: problems}
}

func loadPart(environ map[string]string, part any) []error {
	vars := Vars(part)
	environ, problems := readSecretFiles(environ, vars)
	err := env.ParseWithOptions(part, env.Options{Environment: environ, FuncMap: parsers})
	var agg env.AggregateError
	switch {
	case errors.As(err, &agg):
		for _, e := range agg.Errors {
			problems = append(problems, explain(e, vars, environ))
		}
	case err != nil:
		problems = append(problems, err)
	}
	if v, ok := part.(Validator); ok {
		problems = append(problems, dropReported(v.Validate(), problems)...)
	}
	return problems
}

// parsers give int64 settings, all of which are sizes, and durations their
// units.
var parsers = map[reflect.Type]env.ParserFunc{
	reflect.TypeOf(int64(0)): func(s string) (any, error) { return ParseSize(s) },
	reflect.TypeOf(time.Duration(0)): func(s string) (any, error) {
		return ParseDuration(s)
	},
}

// readSecretFiles puts the content of each secret's <VAR>_FILE in place
// of <VAR>, in a copy of environ.
func readSecretFiles(environ map[string]string, vars []Var) (map[string]string, []error) {
	out := make(map[string]string, len(environ))
	for k, v := range environ {
		out[k] = v
	}
	var problems []error
	for _, v := range vars {
		path := environ[v.Name]
		if v.FileFor == "" || path == "" {
			continue
		}
		if environ[v.FileFor] != "" {
			problems = append(problems, &Error{Var: v.Name, Value: path,
				Problem: "set " + v.FileFor + " or " + v.Name + ", not both"})
			continue
		}
		b, err := os.ReadFile(path)
		if err != nil {
			problems = append(problems, &Error{Var: v.Name, Value: path, Problem: "cannot read the file: " + unwrapPath(err)})
			continue
		}
		out[v.FileFor] = strings.TrimRight(string(b), "\r\n")
	}
	return out, problems
}

func unwrapPath(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}

// explain turns one of env's errors, which name a Go field, into one that
// names the variable.
func explain(err error, vars []Var, environ map[string]string) error {
	var pe env.ParseError
	if errors.As(err, &pe) {
		for _, v := range vars {
			if v.Type == pe.Type && (v.Field == pe.Name || strings.HasSuffix(v.Field, "."+pe.Name)) {
				return &Error{Var: v.Name, Value: Shown(v, valueOf(v, environ)), Hidden: v.Secrecy == Secret, Problem: problemOf(v.Type, pe.Err)}
			}
		}
		return err
	}
	var fe env.LoadFileContentError
	if errors.As(err, &fe) {
		return &Error{Var: fe.Key, Value: fe.Filename, Problem: "cannot read the file: " + unwrapPath(fe.Err)}
	}
	return err
}

func valueOf(v Var, environ map[string]string) string {
	if s, ok := environ[v.Name]; ok {
		return s
	}
	return v.Default
}

// Shown is raw as it may be shown: a secret hidden, a URL's user and
// password redacted.
func Shown(v Var, raw string) string {
	switch {
	case raw == "":
		return ""
	case v.Secrecy == Secret:
		return "(hidden)"
	case v.Secrecy == UserinfoSecret:
		return RedactURLs(raw)
	}
	return raw
}

// RedactURLs replaces the user information of each URL in a
// comma-separated list, so that a password in IMAGEPIPE_NATS_URL can be
// shown nowhere.
func RedactURLs(list string) string {
	parts := strings.Split(list, ",")
	for i, p := range parts {
		p = strings.TrimSpace(p)
		if !strings.Contains(p, "://") && !strings.Contains(p, "@") {
			continue // host:port, which nats.go also takes
		}
		u, err := url.Parse(p)
		if err != nil {
			parts[i] = "(unparsable URL)"
			continue
		}
		if u.User != nil {
			u.User = url.User("redacted")
		}
		parts[i] = u.String()
	}
	return strings.Join(parts, ",")
}

// problemOf says what is wrong with a value that did not parse as t.
func problemOf(t reflect.Type, err error) string {
	switch t {
	case reflect.TypeOf(int64(0)), reflect.TypeOf(time.Duration(0)):
		return err.Error() // ParseSize and ParseDuration say what they want
	}
	if a := Accepts(t); a != "" {
		return "want " + a
	}
	return err.Error()
}

// Accepter is a setting's type that says what values it takes, for
// errors and the README.
type Accepter interface {
	Accepts() string
}

// Accepts says what values of type t a variable takes, or "" for any text.
func Accepts(t reflect.Type) string {
	if a, ok := reflect.Zero(t).Interface().(Accepter); ok {
		return a.Accepts()
	}
	if a, ok := reflect.New(t).Interface().(Accepter); ok {
		return a.Accepts()
	}
	switch t {
	case reflect.TypeOf(int64(0)):
		return SizeAccepts
	case reflect.TypeOf(time.Duration(0)):
		return DurationAccepts
	case reflect.TypeOf(&url.URL{}), reflect.TypeOf(url.URL{}):
		return "a URL"
	case reflect.TypeOf(netip.Prefix{}):
		return "a network such as 10.0.0.0/8 or fd00::/8"
	}
	switch t.Kind() {
	case reflect.Bool:
		return "true or false"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32:
		return "a whole number"
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "a whole number of 0 or more"
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Slice:
		if a := Accepts(t.Elem()); a != "" {
			return "a comma-separated list, each " + a
		}
		return "a comma-separated list"
	}
	return "" // any text, or a type whose own error says what it wants
}

// Error is one setting that cannot work. Its text names the variable,
// the value unless it is a secret, and what is wrong or wanted:
// IMAGEPIPE_S3_SECURE="yes": want true or false.
type Error struct {
	Var     string
	Value   string
	Hidden  bool // a secret: the value is never shown
	Problem string
}

func (e *Error) Error() string {
	v := strconv.Quote(e.Value)
	if e.Hidden {
		v = "(value hidden)"
	}
	return e.Var + "=" + v + ": " + e.Problem
}

// Invalid reports value of variable with what is wanted instead, such as
// "want raw or qcow2".
func Invalid(variable, value, problem string) error {
	return &Error{Var: variable, Value: value, Problem: problem}
}

// InvalidSecret is Invalid for a secret, whose value is never shown.
func InvalidSecret(variable, problem string) error {
	return &Error{Var: variable, Hidden: true, Problem: problem}
}

// OneOf refuses value unless it is one of allowed.
func OneOf(variable, value string, allowed ...string) error {
	for _, a := range allowed {
		if value == a {
			return nil
		}
	}
	return Invalid(variable, value, "want "+orList(allowed))
}

// AtLeast refuses n below min.
func AtLeast[N int | int64](variable string, n, min N) error {
	if n >= min {
		return nil
	}
	return Invalid(variable, fmt.Sprint(n), fmt.Sprintf("want %d or more", min))
}

// Bucket refuses a name S3 does not allow for a bucket: 3 to 63
// characters, lower-case letters, digits, dots and hyphens, starting and
// ending with a letter or digit, and no IP address.
func Bucket(variable, name string) error {
	if bucketName.MatchString(name) && !strings.Contains(name, "..") && net.ParseIP(name) == nil {
		return nil
	}
	return Invalid(variable, name, "want a bucket name of 3 to 63 lower-case letters, digits, dots and hyphens, such as uploads")
}

var bucketName = regexp.MustCompile(`^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$`)

// Positive refuses a zero or negative duration.
func Positive(variable string, d time.Duration) error {
	if d > 0 {
		return nil
	}
	return Invalid(variable, d.String(), "want a duration above zero, such as 30s")
}

func orList(items []string) string {
	switch len(items) {
	case 0:
		return "nothing"
	case 1:
		return items[0]
	}
	return strings.Join(items[:len(items)-1], ", ") + " or " + items[len(items)-1]
}

// Problems is every problem Load found.
type Problems struct {
	List []error
}

func (p *Problems) Error() string {
	if len(p.List) == 1 {
		return "configuration: " + p.List[0].Error()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "configuration: %d problems:", len(p.List))
	for _, e := range p.List {
		b.WriteString("\n  ")
		b.WriteString(e.Error())
	}
	return b.String()
}

// Unwrap gives errors.Is and errors.As every problem.
func (p *Problems) Unwrap() []error { return p.List }

// dropReported splits a Validate error into its problems, leaving out
// those about a variable that already failed to parse: its zero value
// would only repeat the complaint.
func dropReported(err error, reported []error) []error {
	if err == nil {
		return nil
	}
	bad := map[string]bool{}
	for _, r := range reported {
		var e *Error
		if errors.As(r, &e) {
			bad[e.Var] = true
		}
	}
	var list []error
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		list = j.Unwrap()
	} else {
		list = []error{err}
	}
	var out []error
	for _, e := range list {
		var ce *Error
		if errors.As(e, &ce) && bad[ce.Var] {
			continue
		}
		out = append(out, e)
	}
	return out
}
