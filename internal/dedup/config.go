package dedup

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/imagepipe/imagepipe/internal/config"
)

// Config is content de-duplication's settings. Convert embeds it; the
// `imagepipe dedup` command reads MaxAge from it.
type Config struct {
	// Enabled turns content de-duplication on or off ("on" or "off").
	Enabled Switch `env:"IMAGEPIPE_DEDUP" envDefault:"on" doc:"content de-duplication"`
	// Hash says what identifies content: the object's ETag and size, free
	// because S3 computes it, or a SHA-256 that convert computes while
	// downloading, which survives a re-upload with another part size and
	// cannot be forged with an MD5 collision.
	Hash Hash `env:"IMAGEPIPE_DEDUP_HASH" envDefault:"etag" doc:"what identifies content: etag (ETag and size, free) or sha256 (computed by convert while downloading)"`
	// MaxAge is how long a record is kept; the bucket expires each record
	// this long after it was written.
	MaxAge Age `env:"IMAGEPIPE_DEDUP_MAX_AGE" envDefault:"90d" doc:"how long a de-duplication record lives"`
}

// Switch is an on/off setting. It accepts on, off, true, false, yes, no, 1
// and 0, because operators write all of them.
type Switch bool

// UnmarshalText parses an on/off value.
func (s *Switch) UnmarshalText(b []byte) error {
	switch strings.ToLower(strings.TrimSpace(string(b))) {
	case "on", "true", "yes", "1":
		*s = true
	case "off", "false", "no", "0":
		*s = false
	default:
		return fmt.Errorf("%q is not on or off", b)
	}
	return nil
}

// Accepts says what a Switch takes.
func (Switch) Accepts() string { return "on or off (also true/false, yes/no, 1/0)" }

// MarshalText prints "on" or "off".
func (s Switch) MarshalText() ([]byte, error) {
	if s {
		return []byte("on"), nil
	}
	return []byte("off"), nil
}

// Hash names what identifies a content.
type Hash string

// The content identities ContentKey and ContentKeySHA256 build.
const (
	HashETag   Hash = "etag"
	HashSHA256 Hash = "sha256"
)

// Accepts says what a Hash takes.
func (Hash) Accepts() string { return "etag or sha256" }

// UnmarshalText accepts etag or sha256, in any case.
func (h *Hash) UnmarshalText(b []byte) error {
	switch v := Hash(strings.ToLower(strings.TrimSpace(string(b)))); v {
	case HashETag, HashSHA256:
		*h = v
		return nil
	}
	return fmt.Errorf("%q is not etag or sha256", b)
}

// Age is a duration that also accepts whole days ("90d"), the unit people
// think of retention in; Go durations ("36h", "90m") work too.
type Age time.Duration

// UnmarshalText parses an age with ParseAge.
func (a *Age) UnmarshalText(b []byte) error {
	d, err := ParseAge(string(b))
	if err != nil {
		return err
	}
	*a = Age(d)
	return nil
}

// Accepts says what an Age takes.
func (Age) Accepts() string { return config.DurationAccepts }

// Duration is the age as a time.Duration.
func (a Age) Duration() time.Duration { return time.Duration(a) }

// String prints whole days as "90d" and anything else as a Go duration.
func (a Age) String() string {
	d := time.Duration(a)
	if d > 0 && d%(24*time.Hour) == 0 {
		return strconv.FormatInt(int64(d/(24*time.Hour)), 10) + "d"
	}
	return d.String()
}

// ParseAge parses "90d" as 90 days, or any Go duration. Negative ages are
// refused: "older than minus a day" means nothing.
func ParseAge(s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	d, err := config.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("age %q: want whole days such as 90d, or a Go duration such as 36h", s)
	}
	if d < 0 {
		return 0, fmt.Errorf("age %q is negative", s)
	}
	return d, nil
}

// MarshalText prints the age as String does.
func (a Age) MarshalText() ([]byte, error) { return []byte(a.String()), nil }
