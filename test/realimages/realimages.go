// Package realimages reads the corpus of disk images written by other
// tools (Windows, VirtualBox, VMware exporters, qemu-img), stored gzipped
// with the verdict each must get in EXPECTED.tsv. The corpus sits beside
// the repository in CI, not in a user's clone; tests that read it skip,
// saying why, where it is absent.
package realimages

import (
	"bufio"
	"compress/gzip"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Image is one line of EXPECTED.tsv.
type Image struct {
	File    string // path under the corpus, without .gz
	Verdict string // convert, refuse or either
	Format  string // what it must be read as, for convert
	Why     string
}

// Dir is the corpus: IMAGEPIPE_REAL_TESTDATA, or shared/testdata/real
// beside the repository. fromRepo is the path from the test's package
// directory to the repository root.
func Dir(fromRepo string) string {
	if d := os.Getenv("IMAGEPIPE_REAL_TESTDATA"); d != "" {
		return d
	}
	return filepath.Join(fromRepo, "..", "shared", "testdata", "real")
}

// Expected reads dir's EXPECTED.tsv, skipping t when there is none.
func Expected(t *testing.T, dir string) []Image {
	t.Helper()
	f, err := os.Open(filepath.Join(dir, "EXPECTED.tsv"))
	if errors.Is(err, os.ErrNotExist) {
		t.Skipf("no real images at %s: that folder sits beside the repository in CI only (set IMAGEPIPE_REAL_TESTDATA to use another)", dir)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []Image
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		cols := strings.Split(sc.Text(), "\t")
		if len(cols) < 3 {
			continue
		}
		img := Image{File: cols[0], Verdict: cols[1], Format: cols[2]}
		if len(cols) > 3 {
			img.Why = cols[3]
		}
		out = append(out, img)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// Gunzip writes the image stored as dir/file.gz to dst and returns dst.
func Gunzip(t *testing.T, dir, file, dst string) string {
	t.Helper()
	in, err := os.Open(filepath.Join(dir, file+".gz"))
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	zr, err := gzip.NewReader(in)
	if err != nil {
		t.Fatal(err)
	}
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, zr); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	return dst
}
