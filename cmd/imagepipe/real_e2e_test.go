package main

import (
	"archive/tar"
	"bufio"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/test/stack"
)

// realImagesDir holds disk images written by other tools, with the verdict
// each must get in EXPECTED.tsv. It sits beside the repository in CI, not
// in a user's clone.
func realImagesDir() string {
	if d := os.Getenv("IMAGEPIPE_REAL_TESTDATA"); d != "" {
		return d
	}
	return filepath.Join("..", "..", "..", "shared", "testdata", "real")
}

type realImage struct {
	file, verdict, format, why string
}

func readExpected(t *testing.T, dir string) []realImage {
	t.Helper()
	f, err := os.Open(filepath.Join(dir, "EXPECTED.tsv"))
	if errors.Is(err, os.ErrNotExist) {
		t.Skipf("no real images at %s: that folder sits beside the repository in CI only (set IMAGEPIPE_REAL_TESTDATA to use another)", dir)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []realImage
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		cols := strings.Split(sc.Text(), "\t")
		if len(cols) < 3 {
			continue
		}
		ri := realImage{file: cols[0], verdict: cols[1], format: cols[2]}
		if len(cols) > 3 {
			ri.why = cols[3]
		}
		out = append(out, ri)
	}
	return out
}

func gunzipTo(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
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
}

// expectedOutputs is what a careful converter makes of one real image:
// output key → sha256 of `qemu-img convert -f FORMAT -O raw`, disk by disk
// for an OVA.
func expectedOutputs(ri realImage, path, key, scratch string) (map[string]string, error) {
	if ri.format != "ova" {
		sum, _, err := stack.LocalRaw(context.Background(), path, ri.format, scratch)
		return map[string]string{key + ".raw": sum}, err
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]string{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return nil, err
		}
		if !strings.HasSuffix(strings.ToLower(h.Name), ".vmdk") {
			continue
		}
		disk := filepath.Join(scratch, "disk.vmdk")
		df, err := os.Create(disk)
		if err != nil {
			return nil, err
		}
		_, err = io.Copy(df, tr)
		if cerr := df.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, err
		}
		sum, _, err := stack.LocalRaw(context.Background(), disk, "vmdk", scratch)
		if err != nil {
			return nil, err
		}
		out[key+"/"+h.Name+".raw"] = sum
	}
}

func TestRealImagesFromOtherToolsGetTheirVerdict(t *testing.T) {
	dir := realImagesDir()
	images := readExpected(t, dir)
	work := t.TempDir()
	res := subscribeResults(t)

	keys := map[string]string{}
	for _, ri := range images {
		local := filepath.Join(work, strings.ReplaceAll(ri.file, "/", "_"))
		gunzipTo(t, filepath.Join(dir, ri.file+".gz"), local)
		key := "e2e/real/" + ri.file
		keys[ri.file] = key
		upload(t, key, local, false)
	}
	// The local conversions that give the expected bytes run while the
	// stack converts: on two cores, one each.
	type outputs struct {
		sums map[string]string
		err  error
	}
	expected := make(map[string]chan outputs)
	for _, ri := range images {
		expected[ri.file] = make(chan outputs, 1)
	}
	scratch := t.TempDir()
	go func() {
		for _, ri := range images {
			if ri.verdict == "convert" {
				local := filepath.Join(work, strings.ReplaceAll(ri.file, "/", "_"))
				sums, err := expectedOutputs(ri, local, keys[ri.file], scratch)
				expected[ri.file] <- outputs{sums, err}
			}
		}
	}()
	for _, ri := range images {
		t.Run(ri.file, func(t *testing.T) {
			key := keys[ri.file]
			ev := res.await(t, key, 3*time.Minute)
			switch ri.verdict {
			case "convert":
				var want map[string]string
				select {
				case o := <-expected[ri.file]:
					if o.err != nil {
						t.Fatal(o.err)
					}
					want = o.sums
				case <-time.After(3 * time.Minute):
					t.Fatal("local qemu-img conversion did not finish")
				}
				got := map[string]string{}
				for {
					c := converted(t, ev)
					got[c.OutputKey] = c.SHA256
					checkStored(t, c)
					if len(got) == len(want) {
						break
					}
					ev = res.await(t, key, time.Minute)
				}
				for k, sum := range want {
					if got[k] != sum {
						t.Errorf("%s: sha256 %q, qemu-img convert -f %s gives %q (%s)", k, got[k], ri.format, sum, ri.why)
					}
				}
			case "refuse":
				if ev.Type != events.TypeFailed {
					t.Fatalf("converted, but it must be refused (%s): %s", ri.why, ev.Data)
				}
				var f events.Failed
				if err := ev.DecodeData(events.TypeFailed, &f); err != nil {
					t.Fatal(err)
				}
				if f.Message == "" || f.WillRetry {
					t.Errorf("failure %+v: want a final failure with a reason", f)
				}
				if outs := outputsUnder(t, key); len(outs) != 0 {
					t.Errorf("refused image left outputs %v", outs)
				}
				t.Logf("refused (%s): %s", ri.why, f.Message)
			case "either":
				t.Logf("%s: %s", ev.Type, ev.Data)
			}
		})
	}
}

// checkStored compares the stored output with the result event: by its
// bytes for small outputs; for multi-GiB sparse ones, by size and the
// sha256 the converter hashed from the very file it uploaded (the upload
// itself is CRC32C-checked part by part), which keeps the run short.
func checkStored(t *testing.T, c events.Converted) {
	t.Helper()
	if c.OutputSize <= 256<<20 {
		if sum, size := downloadSum(t, c.OutputBucket, c.OutputKey); sum != c.SHA256 || size != c.OutputSize {
			t.Errorf("%s: stored sha256 %s size %d, event says %s size %d", c.OutputKey, sum, size, c.SHA256, c.OutputSize)
		}
		return
	}
	info, err := e2e.s3.StatObject(context.Background(), c.OutputBucket, c.OutputKey, minio.StatObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tg, err := e2e.s3.GetObjectTagging(context.Background(), c.OutputBucket, c.OutputKey, minio.GetObjectTaggingOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if sum := tg.ToMap()["imagepipe-sha256"]; info.Size != c.OutputSize || sum != c.SHA256 {
		t.Errorf("%s: stored size %d tagged sha256 %s, event says size %d sha256 %s", c.OutputKey, info.Size, sum, c.OutputSize, c.SHA256)
	}
}
