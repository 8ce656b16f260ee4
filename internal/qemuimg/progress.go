package qemuimg

import (
	"bytes"
	"strconv"
	"strings"
)

// maxProgressToken bounds what ScanProgress holds while waiting for a
// delimiter. qemu-img's progress lines are about 20 bytes; anything longer
// is not progress, and must not make a reader buffer without limit or stop
// reading (which would block qemu-img on a full pipe).
const maxProgressToken = 64

// ScanProgress is a bufio.SplitFunc for the stdout of `qemu-img convert
// -p`, which rewrites one terminal line with "\r" and ends it with "\n".
// It returns the text between delimiters, never an empty token, and cuts
// a longer run without a delimiter into 64-byte tokens, so a scanner using
// it never fails with bufio.ErrTooLong.
func ScanProgress(data []byte, atEOF bool) (advance int, token []byte, err error) {
	skip := 0
	for skip < len(data) && (data[skip] == '\r' || data[skip] == '\n') {
		skip++
	}
	rest := data[skip:]
	if i := bytes.IndexAny(rest, "\r\n"); i >= 0 {
		return skip + i + 1, rest[:i], nil
	}
	if len(rest) >= maxProgressToken {
		return skip + maxProgressToken, rest[:maxProgressToken], nil
	}
	if atEOF && len(rest) > 0 {
		return len(data), rest, nil
	}
	return skip, nil, nil
}

// ParseProgress reads one progress token such as "    (12.34/100%)" and
// returns the percentage. It accepts surrounding white space and a trailing
// "\r", and only plain decimal numbers from 0 to 100: a parser that missed
// the final "(100.00/100%)" would leave a finished job looking stuck.
func ParseProgress(line string) (float64, bool) {
	s := strings.TrimSpace(line)
	s, ok := strings.CutPrefix(s, "(")
	if !ok {
		return 0, false
	}
	s, ok = strings.CutSuffix(s, "/100%)")
	if !ok || !isDecimal(s) {
		return 0, false
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || v > 100 {
		return 0, false
	}
	return v, true
}

// isDecimal accepts digits with an optional fraction, ruling out the
// signs, exponents, hex, "Inf" and "NaN" that strconv.ParseFloat would take.
func isDecimal(s string) bool {
	whole, frac, hasDot := strings.Cut(s, ".")
	if whole == "" || (hasDot && frac == "") {
		return false
	}
	for _, part := range []string{whole, frac} {
		for i := 0; i < len(part); i++ {
			if part[i] < '0' || part[i] > '9' {
				return false
			}
		}
	}
	return true
}

// progressWriter parses progress as qemu-img writes it, holding at most one
// partial token between writes.
type progressWriter struct {
	buf  []byte
	emit func(float64)
}

func (w *progressWriter) Write(p []byte) (int, error) {
	w.buf = append(w.buf, p...)
	rest := w.buf
	for {
		adv, tok, _ := ScanProgress(rest, false)
		if adv == 0 {
			break
		}
		rest = rest[adv:]
		if v, ok := ParseProgress(string(tok)); ok {
			w.emit(v)
		}
	}
	w.buf = append(w.buf[:0], rest...)
	return len(p), nil
}
