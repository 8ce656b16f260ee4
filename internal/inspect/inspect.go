package inspect

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strconv"
	"strings"

	"github.com/dustin/go-humanize"

	"github.com/imagepipe/imagepipe/events"
)

// Format is a disk image format, spelled as qemu-img spells it (VHD is
// "vpc") so that it can be passed to qemu-img -f unchanged. OVA is the
// exception: qemu-img never opens an OVA; its disks are extracted first.
type Format string

// The formats Inspect accepts.
const (
	Raw   Format = "raw"
	Qcow2 Format = "qcow2"
	VHDX  Format = "vhdx"
	VPC   Format = "vpc"
	VMDK  Format = "vmdk"
	VDI   Format = "vdi"
	OVA   Format = "ova"
)

// Report is what the header says.
type Report struct {
	Format Format
	// VirtualSize is the guest-visible size in bytes as the header states
	// it, 0 when the format does not say (OVA). For raw it is the file size.
	VirtualSize int64
	// Details are human-readable facts for logs and failure events, such as
	// "qcow2 v3" or "vmdk createType=streamOptimized".
	Details []string
	// vhdx locates a VHDX's block allocation table, for StoredData.
	vhdx *vhdxLayout
}

// Refusal is a permanent refusal naming the rule that refused the file. No
// retry can change the verdict, so callers classify it as permanent.
type Refusal struct {
	Rule       string // stable kebab-case name, e.g. "backing-file"
	Reason     string // plain words for the person who uploaded the file
	Suggestion string // what that person can do about it
}

// StoredData returns how many bytes of rep's guest disk the image maps to
// stored data, for the formats whose allocation qemu-img cannot report
// (its VHDX driver reads every block as data), and ok false for the rest
// or where the map cannot be read. f is the file rep was made from. The
// count bounds the data a conversion writes, runs of zeros aside.
func StoredData(rep Report, f io.ReaderAt) (n int64, ok bool) {
	if rep.vhdx == nil {
		return 0, false
	}
	return rep.vhdx.storedData(f)
}

func (r *Refusal) Error() string {
	return "refused by rule " + r.Rule + ": " + r.Reason
}

// Limits bound what an image may claim. A zero MaxVirtualSize means no
// limit; the OVA caps are never off, and zero means their defaults
// (DefaultOVAMaxMembers, DefaultOVAMaxDisks).
type Limits struct {
	MaxVirtualSize int64
	// MaxOVAMembers and MaxOVADisks bound the members and the disks of
	// an OVA; one with more is refused whole.
	MaxOVAMembers int
	MaxOVADisks   int
}

// readBudget bounds how much of a file one inspection may read, whatever
// sizes the headers claim. Every structure a format defines is capped well
// below it; only an archive with oversized extended headers, or a cap
// forgotten in this package, can reach it.
const readBudget = 4 << 20

// headSize covers every magic number and boot-sector structure that
// detection compares: MBR and GPT signatures, the tar magic at 257, the VDI
// signature at 0x40 and the fixed-size headers of every format.
const headSize = 4096

// Inspect reads the headers of the image r of the given size, decides its
// format and applies the safety rules. It reads only headers, the footers
// some formats keep at the end of the file, and bounded metadata tables,
// never the whole file. It returns a *Refusal when a rule refuses the image
// (the Report then holds whatever was learned before the refusal) and any
// other error only for read failures.
func Inspect(r io.ReaderAt, size int64, lim Limits) (Report, error) {
	if size < 0 {
		return Report{}, fmt.Errorf("inspect: negative size %d", size)
	}
	s := &source{r: r, size: size}
	head, err := s.try(0, headSize)
	if err != nil {
		return Report{}, err
	}
	rep, err := detect(s, head, lim)
	if err != nil {
		return rep, err
	}
	if err := lim.check(rep); err != nil {
		return rep, err
	}
	return rep, nil
}

// InspectFile is Inspect on a file on disk.
func InspectFile(path string, lim Limits) (Report, error) {
	f, err := os.Open(path)
	if err != nil {
		return Report{}, fmt.Errorf("inspect: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return Report{}, fmt.Errorf("inspect: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return Report{}, fmt.Errorf("inspect %s: not a regular file", path)
	}
	rep, err := Inspect(f, fi.Size(), lim)
	var ref *Refusal
	if err != nil && !errors.As(err, &ref) {
		return rep, fmt.Errorf("inspect %s: %w", path, err)
	}
	return rep, err
}

// headMatch is one format signature found at the start of a file.
type headMatch string

const (
	matchQcow       headMatch = "qcow"
	matchQED        headMatch = "qed"
	matchVHDX       headMatch = "vhdx"
	matchVPC        headMatch = "vpc"
	matchVDI        headMatch = "vdi"
	matchVMDK       headMatch = "vmdk"
	matchCOWD       headMatch = "vmdk3"
	matchSESparse   headMatch = "vmdk-sesparse"
	matchDescriptor headMatch = "vmdk-descriptor"
	matchTar        headMatch = "tar"
)

// headSignatures tell each format by the bytes at the start of a file, in
// the order a refusal of several names them.
var headSignatures = []struct {
	match headMatch
	found func(head []byte) bool
}{
	{matchQcow, bytesAt(0, "QFI\xfb")},
	{matchQED, bytesAt(0, "QED\x00")},
	{matchVHDX, bytesAt(0, "vhdxfile")},
	{matchVPC, bytesAt(0, "conectix")},
	{matchVDI, looksLikeVDI},
	{matchVMDK, bytesAt(0, "KDMV")},
	{matchCOWD, bytesAt(0, "COWD")},
	{matchSESparse, bytesAt(0, "\xbe\xba\xfe\xca\x00\x00\x00\x00")},
	{matchDescriptor, looksLikeDescriptor},
	{matchTar, bytesAt(257, "ustar")},
}

// bytesAt is a signature of fixed bytes at a fixed offset.
func bytesAt(off int, sig string) func(head []byte) bool {
	return func(head []byte) bool {
		return len(head) >= off+len(sig) && string(head[off:off+len(sig)]) == sig
	}
}

// looksLikeVDI requires the banner as well as the signature: the banner is
// informational to VirtualBox and QEMU, but requiring it keeps four stray
// bytes in a raw disk's boot code from passing as VDI.
func looksLikeVDI(head []byte) bool {
	return bytesAt(0, "<<< ")(head) && len(head) >= 0x44 && binary.LittleEndian.Uint32(head[0x40:]) == vdiSignature
}

// headMatches lists every signature present in head. More than one means
// the file can be read as several formats, which is refused rather than
// resolved: a tool that probes picks one, and an attacker picks the file.
func headMatches(head []byte) []headMatch {
	var m []headMatch
	for _, s := range headSignatures {
		if s.found(head) {
			m = append(m, s.match)
		}
	}
	return m
}

func detect(s *source, head []byte, lim Limits) (Report, error) {
	matches := headMatches(head)
	if len(matches) > 1 {
		names := make([]string, len(matches))
		for i, m := range matches {
			names[i] = string(m)
		}
		return Report{}, refuse(events.RulePolyglot, sugReexport,
			"the file carries the signatures of several formats at once (%s)", strings.Join(names, ", "))
	}
	if len(matches) == 1 {
		// A partition table belongs inside a disk, never in the first
		// sector of a container format: finding one there means the same
		// bytes boot as a raw disk and open as an image.
		if pt := partitionTable(head); pt != "" {
			return Report{}, refuse(events.RulePolyglot, sugReexport,
				"the file has a %s header and also a %s partition table in its first sectors", matches[0], pt)
		}
		switch matches[0] {
		case matchQcow:
			return inspectQcow(s, head, lim)
		case matchQED:
			return Report{}, refuse(events.RuleQED, sugConvertFirst,
				"QED images are not accepted: the format is deprecated and no longer maintained")
		case matchVHDX:
			return inspectVHDX(s)
		case matchVPC:
			return inspectVPC(s, head[:min(len(head), vpcFooterSize)], lim)
		case matchVDI:
			return inspectVDI(head)
		case matchVMDK:
			return inspectVMDK(s, head, lim)
		case matchCOWD:
			return Report{Format: VMDK}, refuse(events.RuleVMDKCOWD, sugSingleVMDK,
				"the file is a VMDK3 (ESX 2 COWD) sparse extent, an obsolete format that is not accepted")
		case matchSESparse:
			return Report{Format: VMDK}, refuse(events.RuleVMDKSESparse, sugSESparse,
				"the file is a bare ESXi SESparse extent, the delta of a snapshot without its descriptor or parent")
		case matchDescriptor:
			return Report{Format: VMDK}, refuse(events.RuleVMDKDescriptor, sugSingleVMDK,
				"the file is a VMDK text descriptor, which only points at other files holding the data")
		case matchTar:
			return inspectTar(s, lim)
		}
	}
	// Only a footer-only format can hide behind a raw-looking start. Any
	// raw disk may end in guest data, so the tail is consulted only when
	// nothing matched at the head.
	if s.size >= vpcFooterSize {
		tail, err := s.try(s.size-vpcFooterSize, vpcFooterSize)
		if err != nil {
			return Report{}, err
		}
		if string(tail[:8]) == "conectix" {
			return inspectVPC(s, tail, lim)
		}
	}
	rep := Report{Format: Raw, VirtualSize: s.size, Details: []string{"raw"}}
	if pt := partitionTable(head); pt != "" {
		rep.Details = append(rep.Details, pt+" partition table")
	}
	return rep, nil
}

// partitionTable names the partition table in head ("GPT" or "MBR"), or ""
// when there is none. An MBR counts only with a plausible entry table, as
// OpenStack's inspector does, because 0x55AA alone is too weak a signal.
func partitionTable(head []byte) string {
	if len(head) >= 520 && string(head[512:520]) == "EFI PART" {
		return "GPT"
	}
	if len(head) < 512 || head[510] != 0x55 || head[511] != 0xaa {
		return ""
	}
	used := 0
	for i := range 4 {
		e := head[446+16*i : 446+16*(i+1)]
		if e[0] != 0x00 && e[0] != 0x80 {
			return ""
		}
		if e[4] == 0 {
			continue
		}
		if binary.LittleEndian.Uint32(e[8:]) == 0 || binary.LittleEndian.Uint32(e[12:]) == 0 {
			return ""
		}
		used++
	}
	if used == 0 {
		return ""
	}
	return "MBR"
}

func (lim Limits) check(rep Report) error {
	if lim.MaxVirtualSize > 0 && rep.VirtualSize > lim.MaxVirtualSize {
		return refuseSize(rep.Format, rep.VirtualSize, lim)
	}
	return nil
}

func refuseSize(f Format, size int64, lim Limits) *Refusal {
	return refuse(events.RuleVirtualSize,
		fmt.Sprintf("shrink the disk inside the guest and re-export it, or ask an operator to raise the limit of %s", humanize.IBytes(uint64(lim.MaxVirtualSize))),
		"the %s image claims a virtual size of %s, above the limit of %s", f, humanize.IBytes(uint64(size)), humanize.IBytes(uint64(lim.MaxVirtualSize)))
}

// checkSize refuses a size that does not fit an int64 (no real disk comes
// close) before the generic limit check converts it.
func checkSize(f Format, size uint64, lim Limits) (int64, error) {
	if size > math.MaxInt64 {
		return 0, refuse(events.RuleVirtualSize, sugReexport,
			"the %s image claims a virtual size of %d bytes, more than any disk can have", f, size)
	}
	if lim.MaxVirtualSize > 0 && int64(size) > lim.MaxVirtualSize {
		return 0, refuseSize(f, int64(size), lim)
	}
	return int64(size), nil
}

// Suggestions shared by several rules.
const (
	sugReexport     = "export the disk again from the hypervisor that made it and upload the new file"
	sugUploadAgain  = "the file is incomplete or damaged; upload it again, and check that the copy on your side opens"
	sugConvertFirst = "convert it to qcow2 or raw with qemu-img convert on a trusted machine and upload the result"
	sugSingleVMDK   = "upload a single-file VMDK (monolithicSparse or streamOptimized): export the VM as OVA/OVF, or run vmware-vdiskmanager -r disk.vmdk -t 0 single.vmdk, or qemu-img convert -O vmdk"
	sugSESparse     = "consolidate the snapshots on ESXi and export the VM as OVF/OVA, which writes a streamOptimized VMDK"
	sugFlatten      = "flatten the image where its whole chain is available, e.g. qemu-img convert -O qcow2 top.qcow2 standalone.qcow2, and upload the result"
)

func refuse(rule, suggestion, format string, args ...any) *Refusal {
	return &Refusal{Rule: rule, Reason: fmt.Sprintf(format, args...), Suggestion: suggestion}
}

func truncated(f Format, what string) *Refusal {
	return refuse(events.RuleTruncatedHeader, sugUploadAgain, "the %s file ends before its %s", f, what)
}

// source reads bounded pieces of the image and keeps the total under
// readBudget.
type source struct {
	r    io.ReaderAt
	size int64
	read int64
}

// try reads up to n bytes at off, fewer when the file ends first.
func (s *source) try(off int64, n int) ([]byte, error) {
	if off < 0 || off >= s.size || n <= 0 {
		return nil, nil
	}
	if int64(n) > s.size-off {
		n = int(s.size - off)
	}
	if s.read+int64(n) > readBudget {
		return nil, refuse(events.RuleHeaderTooLarge, sugReexport,
			"inspecting the image needs more than %s of metadata", humanize.IBytes(uint64(readBudget)))
	}
	s.read += int64(n)
	b := make([]byte, n)
	got, err := s.r.ReadAt(b, off)
	if got == n {
		return b, nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return nil, fmt.Errorf("read %d bytes at offset %d: %w", n, off, err)
}

// need reads exactly n bytes at off, refusing the file as truncated when
// it is too short to hold them.
func (s *source) need(f Format, off int64, n int, what string) ([]byte, error) {
	if off < 0 || off > s.size || int64(n) > s.size-off {
		return nil, truncated(f, what)
	}
	return s.try(off, n)
}

// printable renders untrusted bytes for a reason string: quoted, escaped,
// and short enough to keep a hostile name from flooding logs.
func printable(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	const max = 120
	if len(b) > max {
		return strconv.Quote(string(b[:max])) + "..."
	}
	return strconv.Quote(string(b))
}
