package main

import (
	"archive/tar"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/test/realimages"
	"github.com/imagepipe/imagepipe/test/stack"
)

// expectedOutputs is what a careful converter makes of one real image:
// output key → sha256 of `qemu-img convert -f FORMAT -O raw`, disk by disk
// for an OVA.
func expectedOutputs(ri realimages.Image, path, key, scratch string) (map[string]string, error) {
	if ri.Format != "ova" {
		sum, _, err := stack.LocalRaw(context.Background(), path, ri.Format, scratch)
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
		out[events.OVADiskKey("", key, h.Name, "raw")] = sum
	}
}

func TestRealImagesFromOtherToolsGetTheirVerdict(t *testing.T) {
	dir := realimages.Dir(filepath.Join("..", ".."))
	images := realimages.Expected(t, dir)
	work := t.TempDir()
	res := subscribeResults(t)

	keys := map[string]string{}
	for _, ri := range images {
		local := filepath.Join(work, strings.ReplaceAll(ri.File, "/", "_"))
		realimages.Gunzip(t, dir, ri.File, local)
		key := "e2e/real/" + ri.File
		keys[ri.File] = key
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
		expected[ri.File] = make(chan outputs, 1)
	}
	scratch := t.TempDir()
	go func() {
		for _, ri := range images {
			if ri.Verdict == "convert" {
				local := filepath.Join(work, strings.ReplaceAll(ri.File, "/", "_"))
				sums, err := expectedOutputs(ri, local, keys[ri.File], scratch)
				expected[ri.File] <- outputs{sums, err}
			}
		}
	}()
	for _, ri := range images {
		t.Run(ri.File, func(t *testing.T) {
			key := keys[ri.File]
			ev := res.await(t, key, scaled(3*time.Minute))
			switch ri.Verdict {
			case "convert":
				var want map[string]string
				select {
				case o := <-expected[ri.File]:
					if o.err != nil {
						t.Fatal(o.err)
					}
					want = o.sums
				case <-time.After(scaled(3 * time.Minute)):
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
					ev = res.await(t, key, scaled(time.Minute))
				}
				for k, sum := range want {
					if got[k] != sum {
						t.Errorf("%s: sha256 %q, qemu-img convert -f %s gives %q (%s)", k, got[k], ri.Format, sum, ri.Why)
					}
				}
			case "refuse":
				if ev.Type != events.TypeFailed {
					t.Fatalf("converted, but it must be refused (%s): %s", ri.Why, ev.Data)
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
				t.Logf("refused (%s): %s", ri.Why, f.Message)
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
