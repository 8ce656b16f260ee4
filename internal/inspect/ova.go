package inspect

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"path"
	"strings"
)

// ovaMaxMembers bounds the walk over an archive's headers. An OVA holds a
// descriptor, a manifest, perhaps a certificate, and its disks.
const ovaMaxMembers = 64

const sugOVA = "export the appliance again as OVA (the .ovf descriptor first, then its disks), or upload the disk image itself"

// inspectTar walks the member headers of a tar, seeking over their
// contents, and accepts it as an OVA when it holds an OVF descriptor and
// nothing that could escape the directory it is unpacked into. The disks
// inside are inspected on their own after extraction.
func inspectTar(s *source) (Report, error) {
	rep := Report{Format: OVA}
	src := &tarSource{s: s}
	tr := tar.NewReader(src)
	var names []string
	ovf := false
	for range ovaMaxMembers {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			var ref *Refusal
			switch {
			case errors.As(err, &ref):
				return rep, ref
			case src.err != nil:
				return rep, src.err
			case errors.Is(err, io.ErrUnexpectedEOF):
				return rep, truncated(OVA, "last member")
			default:
				return rep, refuse("ova-member", sugOVA, "the archive is not a valid tar: %v", err)
			}
		}
		name := h.Name
		switch h.Typeflag {
		case tar.TypeReg, tar.TypeGNUSparse, tar.TypeDir:
		case tar.TypeXGlobalHeader:
			continue
		default:
			return rep, refuse("ova-member", sugOVA,
				"the archive member %s is a link or special file, which an OVA never holds", printable([]byte(name)))
		}
		if path.IsAbs(name) || strings.Contains(name, `\`) || strings.Contains("/"+name+"/", "/../") {
			return rep, refuse("ova-member", sugOVA,
				"the archive member name %s points outside the archive", printable([]byte(name)))
		}
		if strings.HasSuffix(strings.ToLower(name), ".ovf") {
			ovf = true
		}
		names = append(names, name)
	}
	if !ovf {
		return rep, refuse("ova-descriptor", sugOVA,
			"the tar archive holds no .ovf descriptor, so it is not an OVA (members: %s)", memberList(names))
	}
	rep.Details = append(rep.Details, "ova members: "+memberList(names))
	return rep, nil
}

func memberList(names []string) string {
	const show = 16
	q := make([]string, 0, min(len(names), show))
	for _, n := range names[:min(len(names), show)] {
		q = append(q, printable([]byte(n)))
	}
	s := strings.Join(q, ", ")
	if len(names) > show {
		s += fmt.Sprintf(" and %d more", len(names)-show)
	}
	if s == "" {
		s = "none"
	}
	return s
}

// tarSource presents the image to archive/tar as a seekable stream, so
// that member contents are skipped rather than read, and every byte that
// is read counts against the inspection budget.
type tarSource struct {
	s   *source
	off int64
	err error // the first read failure, kept apart from format errors
}

func (t *tarSource) Read(p []byte) (int, error) {
	if t.off >= t.s.size {
		return 0, io.EOF
	}
	b, err := t.s.try(t.off, min(len(p), 64<<10))
	if err != nil {
		var ref *Refusal
		if !errors.As(err, &ref) && t.err == nil {
			t.err = err
		}
		return 0, err
	}
	n := copy(p, b)
	t.off += int64(n)
	return n, nil
}

func (t *tarSource) Seek(offset int64, whence int) (int64, error) {
	switch whence {
	case io.SeekStart:
	case io.SeekCurrent:
		offset += t.off
	case io.SeekEnd:
		offset += t.s.size
	default:
		return 0, errors.New("seek: invalid whence")
	}
	if offset < 0 {
		return 0, errors.New("seek: negative position")
	}
	t.off = offset
	return offset, nil
}
