package inspect

import (
	"cmp"
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"fmt"
	"hash"
	"io"
	"regexp"
	"slices"
	"strings"

	"github.com/imagepipe/imagepipe/events"
)

// manifestLine is one OVF manifest entry: SHA256(disk1.vmdk)= 0123…
var manifestLine = regexp.MustCompile(`^(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9a-fA-F]+)$`)

var digestLen = map[string]int{"SHA1": 40, "SHA256": 64, "SHA512": 128}

// parseManifest reads the manifest's entries; each names a member of the
// archive, once, with a digest of the right length.
func (a *OVAArchive) parseManifest(b []byte) ([]ovaDigest, error) {
	var out []ovaDigest
	listed := map[string]bool{}
	text := strings.TrimPrefix(string(b), "\ufeff")
	for line := range strings.SplitSeq(text, "\n") {
		line = strings.TrimSpace(line)
		if line == "" {
			continue
		}
		m := manifestLine.FindStringSubmatch(line)
		if m == nil {
			return nil, refuse(events.RuleOVAManifest, sugOVAManifest, "the OVA manifest has a line it cannot read: %s", printable([]byte(line)))
		}
		algo, name, sum := m[1], m[2], strings.ToLower(m[3])
		if len(sum) != digestLen[algo] {
			return nil, refuse(events.RuleOVAManifest, sugOVAManifest, "the OVA manifest gives %s a %s digest of %d hex digits, not %d",
				printable([]byte(name)), algo, len(sum), digestLen[algo])
		}
		member, ok := a.member(name)
		if !ok || name == a.Manifest {
			return nil, refuse(events.RuleOVAManifest, sugOVAManifest, "the OVA manifest lists %s, which is not a file it can vouch for in the archive", printable([]byte(name)))
		}
		if listed[name] {
			return nil, refuse(events.RuleOVAManifest, sugOVAManifest, "the OVA manifest lists %s twice", printable([]byte(name)))
		}
		listed[name] = true
		out = append(out, ovaDigest{member: member, algo: algo, sum: sum})
	}
	slices.SortFunc(out, func(x, y ovaDigest) int { return cmp.Compare(x.member.Offset, y.member.Offset) })
	return out, nil
}

// CheckManifest reads every member the manifest lists, in archive order,
// and refuses the archive when one differs from its digest. It reads bytes
// and writes nothing, so it costs one read of the archive and no scratch
// space, and a tampered archive is refused before any of it is extracted.
// It stops when ctx is done.
func (a *OVAArchive) CheckManifest(ctx context.Context, r io.ReaderAt) error {
	buf := make([]byte, 1<<20)
	for _, d := range a.digests {
		h := newDigest(d.algo)
		if err := hashSection(ctx, h, io.NewSectionReader(r, d.member.Offset, d.member.Size), buf); err != nil {
			return fmt.Errorf("hash %s in the OVA: %w", d.member.Name, err)
		}
		if got := hex.EncodeToString(h.Sum(nil)); got != d.sum {
			return refuse(events.RuleOVAManifest, sugOVAManifest, "%s of %s is %s, the OVA manifest says %s",
				d.algo, printable([]byte(d.member.Name)), got, d.sum)
		}
	}
	return nil
}

func newDigest(algo string) hash.Hash {
	switch algo {
	case "SHA1":
		return sha1.New()
	case "SHA512":
		return sha512.New()
	}
	return sha256.New()
}

func hashSection(ctx context.Context, h hash.Hash, r io.Reader, buf []byte) error {
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, err := r.Read(buf)
		h.Write(buf[:n])
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}
