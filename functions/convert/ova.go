package convert

import (
	"archive/tar"
	"bufio"
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/direct"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/inspect"
)

const sugOVA = "export the appliance again as an OVA holding its .ovf descriptor and its VMDK disks, or upload the disk image itself"

const sugOVAManifest = "export the appliance again; a file in the OVA does not match its manifest (.mf), so it was damaged or altered"

// convertOVA converts each disk of an OVA in turn, streaming it out of the
// archive into scratch; members that are not disks (the descriptor, the
// manifest, a certificate) are read only to check them, never extracted.
// Outputs go under the OVA's key: apps/web.ova/web-disk1.vmdk.raw.
func (h *Handler) convertOVA(ctx context.Context, j *job) error {
	f, err := os.Open(j.input)
	if err != nil {
		return failure.Retryable(events.PhaseInspect, err, "")
	}
	defer f.Close()

	var (
		manifest = map[string]string{} // member → "sha1:hex" or "sha256:hex"
		digests  = map[string][2]string{}
		n        int
	)
	tr := tar.NewReader(bufio.NewReaderSize(f, 1<<20))
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return failure.Refused(events.PhaseInspect, "ova-member", fmt.Errorf("read the OVA archive: %w", err), sugOVA)
		}
		if hdr.Typeflag != tar.TypeReg && hdr.Typeflag != tar.TypeGNUSparse {
			continue
		}
		name := hdr.Name
		if strings.HasSuffix(strings.ToLower(name), ".mf") {
			if err := parseManifest(io.LimitReader(tr, 1<<20), manifest); err != nil {
				return failure.Refused(events.PhaseInspect, "ova-manifest", err, sugOVAManifest)
			}
			continue
		}
		if _, isDisk := inspect.FormatFromKey(name); !isDisk && !strings.HasSuffix(strings.ToLower(name), ".img") {
			continue
		}
		// Inspect refused such names already; the output key is built from
		// the name, so it is checked again where it is used.
		if clean := path.Clean(name); path.IsAbs(name) || clean == ".." || strings.HasPrefix(clean, "../") || strings.Contains(name, "\\") {
			return failure.Refused(events.PhaseInspect, "ova-member", fmt.Errorf("the archive member name %q points outside the archive", name), sugOVA)
		}
		n++
		d := &disk{
			member: name,
			input:  filepath.Join(j.dir, fmt.Sprintf("disk-%d", n)),
			output: filepath.Join(j.dir, fmt.Sprintf("disk-%d.%s", n, j.outFormat)),
			extKey: name,
			outKey: j.Key + "/" + path.Clean(name) + "." + j.outFormat,
		}
		sums, err := extract(tr, d.input)
		if err != nil {
			if isNoSpace(err) {
				return failure.Retryable(events.PhaseInspect, fmt.Errorf("scratch space full while extracting %s: %w", name, err), "free space in IMAGEPIPE_SCRATCH_DIR")
			}
			return failure.Refused(events.PhaseInspect, "ova-member", fmt.Errorf("extract %s from the OVA: %w", name, err), sugOVA)
		}
		digests[name] = sums
		if err := checkManifest(manifest, name, sums); err != nil {
			return err
		}
		rep, err := inspect.InspectFile(d.input, h.limits())
		if err != nil {
			return classifyInspect(fmt.Errorf("disk %s of the OVA: %w", name, err))
		}
		d.format = rep.Format
		if rep.Format == inspect.OVA {
			return failure.Refused(events.PhaseInspect, "ova-member", fmt.Errorf("disk %s of the OVA is itself an archive", name), sugOVA)
		}
		j.disks = append(j.disks, d)
		if err := h.convertDisk(ctx, j, d, rep); err != nil {
			return err
		}
	}
	if n == 0 {
		return failure.Refused(events.PhaseInspect, "ova-no-disk", errors.New("the OVA holds no disk image"), sugOVA)
	}
	// A manifest stored after the disks is checked once they are read.
	for name, sums := range digests {
		if err := checkManifest(manifest, name, sums); err != nil {
			return err
		}
	}
	return nil
}

func extract(r io.Reader, dst string) ([2]string, error) {
	f, err := direct.Create(dst)
	if err != nil {
		return [2]string{}, err
	}
	s1, s256 := sha1.New(), sha256.New()
	_, err = io.Copy(io.MultiWriter(f, s1, s256), r)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return [2]string{hex.EncodeToString(s1.Sum(nil)), hex.EncodeToString(s256.Sum(nil))}, err
}

// manifestLine is one OVF manifest entry: SHA256(disk1.vmdk)= 0123…
var manifestLine = regexp.MustCompile(`^(SHA1|SHA256)\s*\(([^)]+)\)\s*=\s*([0-9a-fA-F]+)\s*$`)

func parseManifest(r io.Reader, into map[string]string) error {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" {
			continue
		}
		m := manifestLine.FindStringSubmatch(line)
		if m == nil {
			return fmt.Errorf("the OVA manifest has a line it cannot read: %q", line)
		}
		into[m[2]] = strings.ToLower(m[1]) + ":" + strings.ToLower(m[3])
	}
	return sc.Err()
}

func checkManifest(manifest map[string]string, name string, sums [2]string) error {
	want, ok := manifest[name]
	if !ok {
		return nil
	}
	algo, hexsum, _ := strings.Cut(want, ":")
	got := sums[1]
	if algo == "sha1" {
		got = sums[0]
	}
	if got != hexsum {
		return failure.Refused(events.PhaseInspect, "ova-manifest",
			fmt.Errorf("%s of %s is %s, the OVA manifest says %s", strings.ToUpper(algo), name, got, hexsum), sugOVAManifest)
	}
	return nil
}
