package inspect

import (
	"archive/tar"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/test/realimages"
)

// mustRefuseHere are the hostile real images whose danger is in the
// header, so Inspect itself must refuse them rather than leave them to
// qemu-img.
var mustRefuseHere = map[string]bool{
	"cdi/invalid-qcow-large-size.img":          true, // qcow v1 claiming 152 TiB
	"cdi/invalid-qcow-backing-file.img":        true, // VMDK grain directory beyond qemu's limit
	"cdi/invalid-qcow-large-memory.img":        true, // likewise
	"dissect/differencing.avhdx":               true,
	"dfvfs/fat-differential.vhd":               true,
	"dfvfs/image.vhd":                          true, // bad footer checksum
	"dfvfs/image-differential.vhd":             true,
	"dissect/backing-chain-1.qcow2":            true,
	"dissect/backing-chain-2.qcow2":            true,
	"dissect/data-file.qcow2":                  true,
	"cdi/cirros-snapshot1.qcow2":               true,
	"cdi/cirros-snapshot2.qcow2":               true,
	"dissect/sesparse.vmdk":                    true,
	"cdi/qcow2-but-other-extension.tar":        true, // a tar without an OVF
	"govmomi/ttylinux-pc_i486-16.1-disk1.vmdk": true, // streamOptimized without its footer
}

// Refuse cases whose headers are sound and whose damage is in the data
// are left to qemu-img (or to inspecting the disks an OVA holds, once
// extracted): today those are the two OVAs, whose own tar structure is
// valid while the VMDK inside is truncated (govmomi ttylinux) or has a
// mangled grain table (forklift 2nd_disk). Both VMDKs are refused by
// Inspect once extracted, which this test checks too.
func TestInspectRealImages(t *testing.T) {
	dir := realimages.Dir(filepath.Join("..", ".."))
	images := realimages.Expected(t, dir)
	_, qemuErr := exec.LookPath("qemu-img")

	lim := Limits{MaxVirtualSize: 1 << 40}
	var leftForQemu []string
	for _, img := range images {
		file, verdict, format := img.File, img.Verdict, img.Format
		t.Run(file, func(t *testing.T) {
			work := t.TempDir()
			path := realimages.Gunzip(t, dir, file, filepath.Join(work, filepath.Base(file)))
			rep, err := inspectWithin(t, path, lim)
			var ref *Refusal
			refused := errors.As(err, &ref)
			if err != nil && !refused {
				t.Fatalf("I/O error: %v", err)
			}
			switch verdict {
			case "convert":
				if err != nil {
					t.Fatalf("want %s, got %v", format, err)
				}
				if string(rep.Format) != format {
					t.Fatalf("format = %s, want %s", rep.Format, format)
				}
				if rep.Format == OVA {
					for _, m := range inspectMembers(t, path, work, lim) {
						if m.err != nil {
							t.Errorf("disk %s in a good OVA refused: %v", m.name, m.err)
						}
					}
				} else if qemuErr == nil {
					info := qemuInfo(t, work, filepath.Base(path), string(rep.Format))
					if _, err := CheckQemuInfo(rep, info, filepath.Base(path), lim); err != nil {
						t.Errorf("CheckQemuInfo: %v", err)
					}
				}
				t.Logf("%s, %d bytes, %q", rep.Format, rep.VirtualSize, rep.Details)
			case "refuse":
				if refused {
					t.Logf("refused by %s: %s", ref.Rule, ref.Reason)
					return
				}
				if mustRefuseHere[file] {
					t.Fatalf("accepted as %s, but its header alone should refuse it", rep.Format)
				}
				note := file
				if rep.Format == OVA {
					for _, m := range inspectMembers(t, path, work, lim) {
						if errors.As(m.err, &ref) {
							note += " (its disk " + m.name + " is refused by " + ref.Rule + " once extracted)"
						}
					}
				}
				leftForQemu = append(leftForQemu, note)
			case "either":
				t.Logf("%s (%v): either verdict is fine, and it did not hang", rep.Format, err)
			default:
				t.Fatalf("unknown verdict %q", verdict)
			}
		})
	}
	t.Logf("refuse cases left for qemu-img or the OVA reader: %d", len(leftForQemu))
	for _, f := range leftForQemu {
		t.Log("  " + f)
	}
}

// inspectWithin fails the test if Inspect does not finish promptly: a
// hostile header must never make it loop or wait.
func inspectWithin(t *testing.T, path string, lim Limits) (Report, error) {
	t.Helper()
	type result struct {
		rep Report
		err error
	}
	done := make(chan result, 1)
	go func() {
		rep, err := InspectFile(path, lim)
		done <- result{rep, err}
	}()
	select {
	case r := <-done:
		return r.rep, r.err
	case <-time.After(10 * time.Second):
		t.Fatal("Inspect did not finish within 10s")
		return Report{}, nil
	}
}

type memberResult struct {
	name string
	err  error
}

// inspectMembers extracts the disks of an OVA (everything but the
// descriptor, manifest and certificate) into work and inspects each.
func inspectMembers(t *testing.T, ova, work string, lim Limits) []memberResult {
	t.Helper()
	f, err := os.Open(ova)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var res []memberResult
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		switch strings.ToLower(filepath.Ext(h.Name)) {
		case ".ovf", ".mf", ".cert":
			continue
		}
		dst := filepath.Join(work, "member-"+filepath.Base(h.Name))
		out, err := os.Create(dst)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(out, tr); err != nil {
			t.Fatal(err)
		}
		if err := out.Close(); err != nil {
			t.Fatal(err)
		}
		_, err = InspectFile(dst, lim)
		res = append(res, memberResult{h.Name, err})
	}
	return res
}
