package inspect

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"path"
	"slices"
	"strconv"
	"strings"

	"github.com/dustin/go-humanize"

	"github.com/imagepipe/imagepipe/events"
)

// An OVA is a tar archive chosen by the uploader, so every header in it is
// an attacker's claim. The archive is judged whole, in one pass over its
// headers, before any byte of it is extracted: archive/tar would otherwise
// expand a sparse member to whatever size its header claims, follow a link
// out of the directory it is unpacked into, or let a second member of the
// same name replace the first after it was checked. Nothing is taken on
// trust from a member that the descriptor does not declare.

// The caps on an OVA when Limits leaves them zero. An appliance holds a
// descriptor, a manifest, perhaps a certificate, and its disks.
const (
	DefaultOVAMaxMembers = 64
	DefaultOVAMaxDisks   = 16
)

const (
	// ovfMaxSize and manifestMaxSize bound what is read of the descriptor
	// and the manifest: real ones are a few KiB.
	ovfMaxSize      = 1 << 20
	manifestMaxSize = 1 << 20
	// memberNameMax is the longest member name accepted, a file name's
	// limit on every common file system.
	memberNameMax = 255
)

const (
	sugOVA         = "export the appliance again as OVA (the .ovf descriptor first, then its disks), or upload the disk image itself"
	sugOVAManifest = "export the appliance again; a file in the OVA does not match its manifest (.mf), so it was damaged or altered"
	sugOVATar      = "export the appliance again with the hypervisor's OVA export (or `tar --format=ustar -cf app.ova app.ovf app.mf app-disk1.vmdk`); an OVA holds only plain files, each once, each declared in the .ovf"
)

// OVAArchive is an archive that passed the first pass: every member a plain
// file, named safely and only once, declared by the descriptor, and the
// manifest well formed. Its digests are checked by CheckManifest, which
// reads the members' bytes.
type OVAArchive struct {
	// Members are every file in the archive, in archive order.
	Members []OVAMember
	// Disks are the members to convert, in archive order: those the
	// descriptor's DiskSection refers to, and any declared file whose name
	// says it is a disk image.
	Disks []OVAMember
	// Descriptor and Manifest name the .ovf and the .mf ("" when none).
	Descriptor, Manifest string
	digests              []ovaDigest
}

// OVAMember is one file in an OVA. Name has passed the name rules: no
// "/", "\", ".." or control characters, so it is safe in an object key.
type OVAMember struct {
	Name   string
	Offset int64 // of the member's contents in the archive
	Size   int64
}

type ovaDigest struct {
	member    OVAMember
	algo, sum string // "SHA256", lower-case hex
}

// ReadOVA makes the first pass over the OVA r of the given size, reading
// headers, the descriptor and the manifest and nothing else, and applies
// every rule an archive must pass. Inspect makes the same pass, so that an
// archive it accepts is one convert accepts. It returns a *Refusal naming
// the rule that refused the archive, or another error for read failures.
func ReadOVA(r io.ReaderAt, size int64, lim Limits) (*OVAArchive, error) {
	return readOVA(&source{r: r, size: size}, lim)
}

// inspectTar accepts a tar as an OVA when ReadOVA does.
func inspectTar(s *source, lim Limits) (Report, error) {
	rep := Report{Format: OVA}
	a, err := readOVA(s, lim)
	if err != nil {
		return rep, err
	}
	names := make([]string, len(a.Members))
	for i, m := range a.Members {
		names[i] = m.Name
	}
	disks := make([]string, len(a.Disks))
	for i, m := range a.Disks {
		disks[i] = m.Name
	}
	rep.Details = append(rep.Details, "ova members: "+memberList(names), "ova disks: "+memberList(disks))
	if a.Manifest != "" {
		rep.Details = append(rep.Details, fmt.Sprintf("ova manifest: %d digests", len(a.digests)))
	}
	return rep, nil
}

func readOVA(s *source, lim Limits) (*OVAArchive, error) {
	a := &OVAArchive{}
	members, err := walkTar(s, lim.ovaMaxMembers())
	if err != nil {
		return nil, err
	}
	a.Members = members
	if err := a.findMetadata(); err != nil {
		return nil, err
	}
	desc, err := a.readMember(s, a.Descriptor, ovfMaxSize, events.RuleOVADescriptor, "descriptor")
	if err != nil {
		return nil, err
	}
	env, err := parseOVF(desc)
	if err != nil {
		return nil, err
	}
	if err := a.checkDeclared(env); err != nil {
		return nil, err
	}
	if err := a.pickDisks(env, lim); err != nil {
		return nil, err
	}
	if a.Manifest != "" {
		mf, err := a.readMember(s, a.Manifest, manifestMaxSize, events.RuleOVAManifest, "manifest")
		if err != nil {
			return nil, err
		}
		if a.digests, err = a.parseManifest(mf); err != nil {
			return nil, err
		}
	}
	return a, nil
}

func (lim Limits) ovaMaxMembers() int {
	if lim.MaxOVAMembers > 0 {
		return lim.MaxOVAMembers
	}
	return DefaultOVAMaxMembers
}

func (lim Limits) ovaMaxDisks() int {
	if lim.MaxOVADisks > 0 {
		return lim.MaxOVADisks
	}
	return DefaultOVAMaxDisks
}

// walkTar reads every header of the archive, seeking over contents, and
// refuses the whole archive on the first member that breaks a rule or once
// it holds more than maxMembers. It never stops early and accepts: a rule
// that looked at only the first members would let the rest through.
func walkTar(s *source, maxMembers int) ([]OVAMember, error) {
	src := &tarSource{s: s}
	tr := tar.NewReader(src)
	var members []OVAMember
	seen := map[string]bool{}
	for n := 1; ; n++ {
		h, err := tr.Next()
		if err == io.EOF {
			return members, nil
		}
		if err != nil {
			return nil, tarError(src, err)
		}
		if n > maxMembers {
			return nil, refuse(events.RuleOVAMembers, "split the appliance, or ask an operator to raise IMAGEPIPE_OVA_MAX_MEMBERS",
				"the archive holds more than %d members, the limit set by IMAGEPIPE_OVA_MAX_MEMBERS", maxMembers)
		}
		keep, err := checkHeader(h)
		if err != nil {
			return nil, err
		}
		if !keep {
			continue
		}
		if seen[h.Name] {
			return nil, refuse(events.RuleOVADuplicateMember, sugOVATar,
				"the archive holds two members named %s; unpacking it keeps only the last, which is not the one a check of the first would see", printable([]byte(h.Name)))
		}
		seen[h.Name] = true
		m := OVAMember{Name: h.Name, Offset: src.off, Size: h.Size}
		if m.Size < 0 || m.Size > s.size-m.Offset {
			return nil, truncated(OVA, "member "+printable([]byte(h.Name)))
		}
		members = append(members, m)
	}
}

// tarError turns archive/tar's failure into a refusal, or passes a read
// failure of the file itself on.
func tarError(src *tarSource, err error) error {
	var ref *Refusal
	switch {
	case errors.As(err, &ref):
		return ref
	case src.err != nil:
		return src.err
	case errors.Is(err, io.ErrUnexpectedEOF):
		return truncated(OVA, "last member")
	}
	return refuse(events.RuleOVAMember, sugOVATar, "the archive is not a valid tar: %v", err)
}

// checkHeader applies the rules of one member's header. keep is false for
// headers that hold no file: a PAX global header, an empty directory.
func checkHeader(h *tar.Header) (keep bool, err error) {
	name := printable([]byte(h.Name))
	if h.Typeflag == tar.TypeGNUSparse || hasSparseRecords(h.PAXRecords) {
		// A sparse member's header states the size it expands to, which
		// need bear no relation to the bytes in the archive: 10 KiB can
		// claim a petabyte. No exporter writes OVA disks this way.
		return false, refuse(events.RuleOVASparse, sugOVATar,
			"the archive member %s is a sparse file claiming %s, which an OVA never holds", name, humanize.IBytes(uint64(max(h.Size, 0))))
	}
	switch h.Typeflag {
	case tar.TypeReg:
	case tar.TypeXGlobalHeader:
		return false, nil
	case tar.TypeDir:
		if h.Size != 0 {
			return false, refuse(events.RuleOVAMember, sugOVATar, "the archive member %s is a directory with contents", name)
		}
		dir := strings.TrimSuffix(h.Name, "/")
		if dir == "." {
			return false, nil
		}
		return false, checkMemberName(dir)
	case tar.TypeLink, tar.TypeSymlink:
		return false, refuse(events.RuleOVAMember, sugOVATar,
			"the archive member %s is a link to %s, which an OVA never holds", name, printable([]byte(h.Linkname)))
	default:
		return false, refuse(events.RuleOVAMember, sugOVATar,
			"the archive member %s is a %s, which an OVA never holds", name, typeName(h.Typeflag))
	}
	return true, checkMemberName(h.Name)
}

func hasSparseRecords(recs map[string]string) bool {
	for k := range recs {
		if strings.HasPrefix(k, "GNU.sparse.") {
			return true
		}
	}
	return false
}

func typeName(t byte) string {
	switch t {
	case tar.TypeChar:
		return "character device"
	case tar.TypeBlock:
		return "block device"
	case tar.TypeFifo:
		return "named pipe"
	case tar.TypeCont:
		return "contiguous file"
	}
	return "member of tar type " + strconv.Quote(string(rune(t)))
}

// checkMemberName applies the key-safety rules to a member's name, which
// becomes part of an output key, and refuses any path: an OVA's files sit
// side by side, and a name with a separator could only be meant to reach
// somewhere else.
func checkMemberName(name string) error {
	q := printable([]byte(name))
	switch {
	case name == "" || name == "." || name == "..":
		return refuse(events.RuleOVAMemberName, sugOVATar, "the archive has a member named %s", q)
	case strings.ContainsAny(name, `/\`):
		return refuse(events.RuleOVAMemberName, sugOVATar,
			"the archive member name %s is a path; an OVA's files are side by side, never in folders", q)
	case len(name) > memberNameMax:
		return refuse(events.RuleOVAMemberName, sugOVATar,
			"the archive member name %s is %d bytes, more than the %d a file name may have", q, len(name), memberNameMax)
	}
	if err := CheckName("member name", name); err != nil {
		return refuse(events.RuleOVAMemberName, sugOVATar, "archive member %s: %v", q, err)
	}
	return nil
}

// findMetadata finds the descriptor, the manifest and the certificate: one
// of each at most, and a descriptor always.
func (a *OVAArchive) findMetadata() error {
	var ovf, mf, cert []string
	for _, m := range a.Members {
		switch strings.ToLower(path.Ext(m.Name)) {
		case ".ovf":
			ovf = append(ovf, m.Name)
		case ".mf":
			mf = append(mf, m.Name)
		case ".cert":
			cert = append(cert, m.Name)
		}
	}
	names := make([]string, len(a.Members))
	for i, m := range a.Members {
		names[i] = m.Name
	}
	switch {
	case len(ovf) == 0:
		return refuse(events.RuleOVADescriptor, sugOVA,
			"the tar archive holds no .ovf descriptor, so it is not an OVA (members: %s)", memberList(names))
	case len(ovf) > 1:
		return refuse(events.RuleOVADescriptor, sugOVA, "the archive holds %d .ovf descriptors (%s); an OVA has one", len(ovf), memberList(ovf))
	case len(mf) > 1:
		return refuse(events.RuleOVAManifest, sugOVA, "the archive holds %d manifests (%s); an OVA has one", len(mf), memberList(mf))
	case len(cert) > 1:
		return refuse(events.RuleOVAMember, sugOVA, "the archive holds %d certificates (%s); an OVA has one", len(cert), memberList(cert))
	}
	a.Descriptor = ovf[0]
	if len(mf) == 1 {
		a.Manifest = mf[0]
	}
	return nil
}

func (a *OVAArchive) member(name string) (OVAMember, bool) {
	i := slices.IndexFunc(a.Members, func(m OVAMember) bool { return m.Name == name })
	if i < 0 {
		return OVAMember{}, false
	}
	return a.Members[i], true
}

// readMember reads a small member whole, refusing one over max bytes by
// rule.
func (a *OVAArchive) readMember(s *source, name string, max int64, rule, what string) ([]byte, error) {
	m, _ := a.member(name)
	if m.Size > max {
		return nil, refuse(rule, sugOVA, "the OVA's %s %s is %s, more than the %s a real one needs",
			what, printable([]byte(name)), humanize.IBytes(uint64(m.Size)), humanize.IBytes(uint64(max)))
	}
	return s.try(m.Offset, int(m.Size))
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
