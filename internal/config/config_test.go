package config_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/internal/config"
)

func TestParseSizeTakesUnitsAsKubectlDoes(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want int64
	}{
		{"0", 0}, {"1048576", 1 << 20}, {"-1", -1},
		{"1G", 1e9}, {"1g", 1e9}, {"1GB", 1e9}, {"512M", 512e6}, {"10k", 10e3},
		{"1Gi", 1 << 30}, {"1GiB", 1 << 30}, {"1gib", 1 << 30}, {"2TiB", 2 << 40}, {"512MiB", 512 << 20},
		{"1.5GiB", 3 << 29}, {" 4 KiB ", 4096}, {"1B", 1},
	} {
		got, err := config.ParseSize(tt.in)
		if err != nil || got != tt.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
		}
	}
	for _, bad := range []string{"", "G", "1X", "1.5", "0.5B", "-1G", "1e9", "8EiB", "1 G B", "one"} {
		if got, err := config.ParseSize(bad); err == nil {
			t.Errorf("ParseSize(%q) = %d, want an error", bad, got)
		}
	}
}

func TestFormatSizePrintsTheLargestExactUnit(t *testing.T) {
	for in, want := range map[int64]string{
		2199023255552: "2TiB", 1099511627776: "1TiB", 5e9: "5G", 1 << 20: "1MiB", 1000001: "1000001", -1: "-1", 0: "0",
	} {
		if got := config.FormatSize(in); got != want {
			t.Errorf("FormatSize(%d) = %q, want %q", in, got, want)
		}
		if back, err := config.ParseSize(config.FormatSize(in)); err != nil || back != in {
			t.Errorf("ParseSize(FormatSize(%d)) = %d, %v", in, back, err)
		}
	}
}

func TestParseDurationTakesDaysAndGoDurations(t *testing.T) {
	day := 24 * time.Hour
	for in, want := range map[string]time.Duration{
		"90d": 90 * day, "1d12h": day + 12*time.Hour, "0d": 0, "0": 0, "36h": 36 * time.Hour,
		"1h30m": 90 * time.Minute, "250ms": 250 * time.Millisecond, " 7d ": 7 * day,
	} {
		if got, err := config.ParseDuration(in); err != nil || got != want {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "d", "90", "1.5d", "-1d", "1dd", "ten minutes", "1d-1h", "999999999999d"} {
		if got, err := config.ParseDuration(bad); err == nil {
			t.Errorf("ParseDuration(%q) = %v, want an error", bad, got)
		}
	}
}

type sample struct {
	Secure  bool          `env:"T_SECURE" envDefault:"false"`
	Size    int64         `env:"T_SIZE" envDefault:"1GiB"`
	Every   time.Duration `env:"T_EVERY" envDefault:"10m"`
	Jobs    int           `env:"T_JOBS" envDefault:"2"`
	Token   string        `env:"T_TOKEN" secret:"true"`
	Format  string        `env:"T_FORMAT" envDefault:"raw"`
	Nested  nested
	Written string `env:"T_WRITTEN,file"`
}

type nested struct {
	Count int `env:"T_COUNT" envDefault:"1"`
}

func (s sample) Validate() error {
	return errors.Join(config.OneOf("T_FORMAT", s.Format, "raw", "qcow2"), config.AtLeast("T_JOBS", s.Jobs, 1))
}

func TestLoadNamesEveryBadVariableAtOnce(t *testing.T) {
	var s sample
	err := config.Load(map[string]string{
		"T_SECURE": "yes", "T_SIZE": "1X", "T_EVERY": "soon", "T_JOBS": "many", "T_FORMAT": "vmdk", "T_COUNT": "x",
		"T_WRITTEN": "/nonexistent/file",
	}, &s)
	if err == nil {
		t.Fatal("Load accepted bad values")
	}
	for _, want := range []string{
		`T_SECURE="yes": want true or false`,
		`T_SIZE="1X": unknown unit "X"`,
		`T_EVERY="soon": want a duration`,
		`T_JOBS="many": want a whole number`,
		`T_FORMAT="vmdk": want raw or qcow2`,
		`T_COUNT="x": want a whole number`,
		`T_WRITTEN="/nonexistent/file": cannot read the file`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
	// T_JOBS failed to parse: its zero value is not reported again as
	// "want 1 or more".
	if strings.Contains(err.Error(), "want 1 or more") {
		t.Errorf("a variable that did not parse is reported twice:\n%v", err)
	}
	if strings.Contains(err.Error(), "parse error on field") {
		t.Errorf("error names a Go field:\n%v", err)
	}
}

func TestLoadTakesUnitsAndDefaults(t *testing.T) {
	var s sample
	if err := config.Load(map[string]string{"T_SIZE": "2TiB", "T_EVERY": "90d"}, &s); err != nil {
		t.Fatal(err)
	}
	if s.Size != 2<<40 || s.Every != 90*24*time.Hour || s.Jobs != 2 || s.Nested.Count != 1 {
		t.Errorf("loaded %+v", s)
	}
	s = sample{}
	if err := config.Load(map[string]string{}, &s); err != nil || s.Size != 1<<30 {
		t.Errorf("defaults: %+v, %v", s, err)
	}
}

func TestEverySecretIsReadableFromAFileAndNeverShown(t *testing.T) {
	file := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(file, []byte("s3cr3t-token\n"), 0o400); err != nil {
		t.Fatal(err)
	}
	var s sample
	if err := config.Load(map[string]string{"T_TOKEN_FILE": file}, &s); err != nil || s.Token != "s3cr3t-token" {
		t.Fatalf("token from file = %q, %v", s.Token, err)
	}
	err := config.Load(map[string]string{"T_TOKEN_FILE": file, "T_TOKEN": "inline-secret"}, &s)
	if err == nil || !strings.Contains(err.Error(), "T_TOKEN or T_TOKEN_FILE, not both") || strings.Contains(err.Error(), "inline-secret") {
		t.Errorf("both set: %v", err)
	}
	err = config.Load(map[string]string{"T_TOKEN_FILE": filepath.Join(t.TempDir(), "missing")}, &s)
	if err == nil || !strings.Contains(err.Error(), "T_TOKEN_FILE=") {
		t.Errorf("missing file: %v", err)
	}
	var names []string
	for _, v := range config.Vars(&s) {
		names = append(names, v.Name)
		if v.Name == "T_TOKEN" && config.Shown(v, "s3cr3t-token") == "s3cr3t-token" {
			t.Error("a secret is shown")
		}
	}
	if !strings.Contains(strings.Join(names, ","), "T_TOKEN_FILE") {
		t.Errorf("Vars lists no T_TOKEN_FILE: %v", names)
	}
}

func TestRedactURLsHidesUserAndPassword(t *testing.T) {
	got := config.RedactURLs("nats://u:hunter2@a:4222, tls://tok3n@b:4222,c:4222")
	if strings.Contains(got, "hunter2") || strings.Contains(got, "tok3n") || !strings.Contains(got, "c:4222") {
		t.Errorf("RedactURLs = %q", got)
	}
}
