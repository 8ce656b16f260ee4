package qemuimg

import (
	"bufio"
	"bytes"
	"fmt"
	"strings"
	"testing"
)

// qemu-img 7.2's stdout for `convert -p` of a small image, byte for byte.
const sampleProgress = "    (0.00/100%)\r    (66.67/100%)\r    (100.00/100%)\r    (100.00/100%)\r\n"

func TestParseProgress(t *testing.T) {
	tests := []struct {
		in   string
		want float64
		ok   bool
	}{
		{"(100.00/100%)", 100, true},
		{"(0.00/100%)", 0, true},
		{"    (12.34/100%)\r", 12.34, true},
		{"    (100.00/100%)\r\n", 100, true},
		{"(7/100%)", 7, true},
		{"(99.999/100%)", 99.999, true},
		{"", 0, false},
		{"garbage", 0, false},
		{"(12.34/100%", 0, false},
		{"12.34/100%)", 0, false},
		{"(12.34/50%)", 0, false},
		{"(100.01/100%)", 0, false},
		{"(-1.00/100%)", 0, false},
		{"(+1.00/100%)", 0, false},
		{"(1e1/100%)", 0, false},
		{"(0x10/100%)", 0, false},
		{"(NaN/100%)", 0, false},
		{"(Inf/100%)", 0, false},
		{"(.5/100%)", 0, false},
		{"(5./100%)", 0, false},
		{"(1_0/100%)", 0, false},
		{"(/100%)", 0, false},
		{"qemu-img: Could not open 'x': No such file", 0, false},
	}
	for _, tt := range tests {
		got, ok := ParseProgress(tt.in)
		if got != tt.want || ok != tt.ok {
			t.Errorf("ParseProgress(%q) = %v, %v; want %v, %v", tt.in, got, ok, tt.want, tt.ok)
		}
	}
}

func TestScanProgressSplitsOnCarriageReturnAndNewline(t *testing.T) {
	sc := bufio.NewScanner(strings.NewReader(sampleProgress + "(5.00/100%)"))
	sc.Split(ScanProgress)
	var got []string
	for sc.Scan() {
		got = append(got, sc.Text())
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	want := []string{"    (0.00/100%)", "    (66.67/100%)", "    (100.00/100%)", "    (100.00/100%)", "(5.00/100%)"}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("tokens = %q, want %q", got, want)
	}
}

func TestScanProgressNeverNeedsABigBuffer(t *testing.T) {
	long := strings.Repeat("x", 1000)
	sc := bufio.NewScanner(strings.NewReader(long + "\r(42.00/100%)\n"))
	sc.Buffer(make([]byte, 0, maxProgressToken), maxProgressToken)
	sc.Split(ScanProgress)
	var last string
	n := 0
	for sc.Scan() {
		if len(sc.Bytes()) > maxProgressToken {
			t.Fatalf("token of %d bytes", len(sc.Bytes()))
		}
		last = sc.Text()
		n++
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("scanner failed: %v", err)
	}
	if last != "(42.00/100%)" || n < 2 {
		t.Fatalf("last token %q after %d tokens", last, n)
	}
}

func TestProgressWriterHandlesSplitWrites(t *testing.T) {
	var got []float64
	w := &progressWriter{emit: func(v float64) { got = append(got, v) }}
	for i := 0; i < len(sampleProgress); i++ {
		if _, err := w.Write([]byte{sampleProgress[i]}); err != nil {
			t.Fatal(err)
		}
	}
	if want := []float64{0, 66.67, 100, 100}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("emitted %v, want %v", got, want)
	}
	if len(w.buf) != 0 {
		t.Fatalf("%d bytes left buffered", len(w.buf))
	}
}

func FuzzParseProgress(f *testing.F) {
	for _, s := range []string{
		"(100.00/100%)", "(0.00/100%)", "    (12.34/100%)\r", "garbage", "(1e2/100%)", "(NaN/100%)",
		"(" + strings.Repeat("9", 400) + "/100%)",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, ok := ParseProgress(s)
		if !ok {
			if v != 0 {
				t.Fatalf("ParseProgress(%q) = %v with ok false", s, v)
			}
			return
		}
		if !(v >= 0 && v <= 100) {
			t.Fatalf("ParseProgress(%q) = %v, outside [0,100]", s, v)
		}
		if _, ok := ParseProgress(fmt.Sprintf("    (%.2f/100%%)\r", v)); !ok {
			t.Fatalf("qemu-img's own rendering of %v is refused", v)
		}
	})
}

func FuzzScanProgress(f *testing.F) {
	f.Add([]byte(sampleProgress))
	f.Add([]byte("\r\r\n\n"))
	f.Add([]byte(strings.Repeat("y", 200) + "\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		sc := bufio.NewScanner(bytes.NewReader(data))
		sc.Buffer(make([]byte, 0, maxProgressToken), maxProgressToken)
		sc.Split(ScanProgress)
		var joined []byte
		for sc.Scan() {
			tok := sc.Bytes()
			if len(tok) == 0 || len(tok) > maxProgressToken || bytes.ContainsAny(tok, "\r\n") {
				t.Fatalf("bad token %q", tok)
			}
			joined = append(joined, tok...)
		}
		if err := sc.Err(); err != nil {
			t.Fatalf("scanner failed: %v", err)
		}
		want := strings.NewReplacer("\r", "", "\n", "").Replace(string(data))
		if string(joined) != want {
			t.Fatalf("tokens lose data: got %q, want %q", joined, want)
		}
	})
}
