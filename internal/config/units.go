package config

import (
	"errors"
	"fmt"
	"math"
	"math/big"
	"strconv"
	"strings"
	"time"
)

// SizeAccepts says what ParseSize accepts, for error messages and the
// README.
const SizeAccepts = "a size such as 512M, 1G (10^9 bytes), 1GiB or 1Gi (2^30 bytes), 2TiB, or a number of bytes"

// DurationAccepts says what ParseDuration accepts.
const DurationAccepts = "a duration such as 90s, 15m, 6h, 1h30m or 90d"

// sizeUnits are the suffixes ParseSize knows, compared without regard to
// case. As in kubectl and the SI, K, M, G, T, P and E are powers of 1000
// and Ki … Ei (or KiB … EiB) powers of 1024; a trailing B is optional.
var sizeUnits = map[string]int64{
	"": 1, "b": 1,
	"k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
	"t": 1e12, "tb": 1e12, "p": 1e15, "pb": 1e15, "e": 1e18, "eb": 1e18,
	"ki": 1 << 10, "kib": 1 << 10, "mi": 1 << 20, "mib": 1 << 20, "gi": 1 << 30, "gib": 1 << 30,
	"ti": 1 << 40, "tib": 1 << 40, "pi": 1 << 50, "pib": 1 << 50, "ei": 1 << 60, "eib": 1 << 60,
}

// ParseSize parses a number of bytes with an optional unit: "1G" is 10^9
// bytes, "1GiB" and "1Gi" are 2^30, "1.5TiB" works when it comes to whole
// bytes. A negative plain number ("-1") is accepted for the settings where
// it means "work it out"; with a unit it is refused.
func ParseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		return n, nil
	}
	i := strings.IndexFunc(s, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if i <= 0 {
		return 0, errors.New("want " + SizeAccepts)
	}
	num, unit := s[:i], strings.ToLower(strings.TrimSpace(s[i:]))
	mult, ok := sizeUnits[unit]
	if !ok {
		return 0, fmt.Errorf("unknown unit %q: want %s", s[i:], SizeAccepts)
	}
	// Exact arithmetic, so that 1.5GiB is 1610612736 and not a float's
	// nearest guess.
	r, ok := new(big.Rat).SetString(num)
	if !ok {
		return 0, errors.New("want " + SizeAccepts)
	}
	r.Mul(r, new(big.Rat).SetInt64(mult))
	if !r.IsInt() {
		return 0, errors.New("not a whole number of bytes")
	}
	if !r.Num().IsInt64() {
		return 0, fmt.Errorf("larger than %d bytes", int64(math.MaxInt64))
	}
	return r.Num().Int64(), nil
}

// FormatSize prints n with the largest binary unit that divides it
// exactly, then the largest decimal one, else as bytes: 2199023255552 is
// "2TiB", 5000000000 is "5G", 1000001 is "1000001".
func FormatSize(n int64) string {
	if n <= 0 {
		return strconv.FormatInt(n, 10)
	}
	for _, u := range []struct {
		suffix string
		size   int64
	}{{"EiB", 1 << 60}, {"PiB", 1 << 50}, {"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10},
		{"E", 1e18}, {"P", 1e15}, {"T", 1e12}, {"G", 1e9}, {"M", 1e6}, {"K", 1e3}} {
		if n%u.size == 0 {
			return strconv.FormatInt(n/u.size, 10) + u.suffix
		}
	}
	return strconv.FormatInt(n, 10)
}

// ParseDuration parses a Go duration ("90s", "1h30m") that may start with
// whole days ("90d", "1d12h"), the unit people think of retention in. A
// bare "0" is zero, as in time.ParseDuration.
func ParseDuration(s string) (time.Duration, error) {
	s = strings.TrimSpace(s)
	if d, err := time.ParseDuration(s); err == nil {
		return d, nil
	}
	days, rest, ok := strings.Cut(s, "d")
	n, err := strconv.ParseInt(days, 10, 64)
	if !ok || err != nil || n < 0 || n > math.MaxInt64/int64(24*time.Hour) {
		return 0, errors.New("want " + DurationAccepts)
	}
	d := time.Duration(n) * 24 * time.Hour
	if rest != "" {
		r, err := time.ParseDuration(rest)
		if err != nil || r < 0 || d > math.MaxInt64-r {
			return 0, errors.New("want " + DurationAccepts)
		}
		d += r
	}
	return d, nil
}
