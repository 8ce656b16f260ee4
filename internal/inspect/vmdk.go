package inspect

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"

	"github.com/imagepipe/imagepipe/events"
)

// VMDK hosted sparse extent header, little-endian and packed (VMware's
// "Virtual Disk Format 1.1", and struct VMDK4Header in QEMU's block/vmdk.c).
const (
	vmdkHeaderSize = 512
	vmdkGDAtEnd    = ^uint64(0)
	// vmdkMaxDescriptor matches the cap QEMU and OpenStack put on an
	// embedded descriptor.
	vmdkMaxDescriptor = 1<<20 - 1
	// vmdkParentScan is the region QEMU searches for parentFileNameHint,
	// whatever the header says about where the descriptor is: 20 sectors
	// from offset 512 (DESC_SIZE and desc_offset in block/vmdk.c).
	vmdkParentScan = 20 * 512
	// QEMU's ceilings on grain table geometry (block/vmdk.c).
	vmdkMaxGTEs      = 512
	vmdkMaxGrain     = 0x200000
	vmdkMaxL1Entries = 32 << 20
	vmdkMarkerEOS    = 0
	vmdkMarkerFooter = 3
	vmdkExtentType   = "SPARSE"
)

type vmdkHeader struct {
	version     uint32
	flags       uint32
	capacity    uint64 // sectors
	grain       uint64 // sectors
	descOffset  uint64 // sectors
	descSize    uint64 // sectors
	gtesPerGT   uint32
	gdOffset    uint64
	grainOffset uint64 // sectors ("overHead")
}

func parseVMDKHeader(b []byte) vmdkHeader {
	le := binary.LittleEndian
	return vmdkHeader{
		version:     le.Uint32(b[4:]),
		flags:       le.Uint32(b[8:]),
		capacity:    le.Uint64(b[12:]),
		grain:       le.Uint64(b[20:]),
		descOffset:  le.Uint64(b[28:]),
		descSize:    le.Uint64(b[36:]),
		gtesPerGT:   le.Uint32(b[44:]),
		gdOffset:    le.Uint64(b[56:]),
		grainOffset: le.Uint64(b[64:]),
	}
}

func inspectVMDK(s *source, head []byte, lim Limits) (Report, error) {
	rep := Report{Format: VMDK}
	if len(head) < vmdkHeaderSize {
		return rep, truncated(VMDK, "sparse extent header")
	}
	h := parseVMDKHeader(head)
	if h.version == 0 || h.version > 3 {
		return rep, refuse(events.RuleVMDKHeader, sugReexport, "the VMDK sparse header has unsupported version %d", h.version)
	}
	// A zero capacity makes QEMU treat the embedded descriptor as a
	// descriptor file and open every extent it lists, relative to the
	// directory the image sits in.
	if h.capacity == 0 {
		return rep, refuse(events.RuleVMDKExtent, sugSingleVMDK,
			"the VMDK sparse header has zero capacity, which makes qemu-img open the extents its descriptor lists as separate files")
	}
	if h.descOffset == 0 || h.descSize == 0 {
		return rep, refuse(events.RuleVMDKCreateType, sugSingleVMDK,
			"the VMDK has no embedded descriptor, so it is one extent of a larger disk rather than a whole disk")
	}
	if h.descOffset != 1 {
		return rep, refuse(events.RuleVMDKHeader, sugReexport,
			"the VMDK descriptor is at sector %d; single-file VMDKs keep it at sector 1", h.descOffset)
	}
	descLen := int(min(h.descSize*512, vmdkMaxDescriptor))
	region, err := s.need(VMDK, 512, max(descLen, min(vmdkParentScan, int(s.size-512))), "embedded descriptor")
	if err != nil {
		return rep, err
	}
	// QEMU finds a parent with strstr over this region, not by parsing
	// the descriptor, so the bytes are searched the same way.
	if bytes.Contains(region[:min(len(region), vmdkParentScan)], []byte("parentFileNameHint")) {
		return rep, refuse(events.RuleBackingFile, sugFlattenVMDK,
			"the VMDK names a parent disk (parentFileNameHint), which qemu-img would open from the host")
	}
	desc, err := parseDescriptor(region[:descLen])
	if err != nil {
		return rep, err
	}
	rep.Details = append(rep.Details, "vmdk createType="+desc.createType, fmt.Sprintf("vmdk version %d", h.version))

	if h.gdOffset == vmdkGDAtEnd {
		// streamOptimized writers that cannot seek put the real header in
		// a footer; QEMU then trusts the footer over the header.
		footer, err := vmdkFooter(s, h)
		if err != nil {
			return rep, err
		}
		h = footer
		rep.Details = append(rep.Details, "grain directory in footer")
	}
	if h.capacity > (1<<63-1)/512 {
		return rep, refuse(events.RuleVirtualSize, sugReexport, "the VMDK claims %d sectors, more than any disk can have", h.capacity)
	}
	size, err := checkSize(VMDK, h.capacity*512, lim)
	if err != nil {
		return rep, err
	}
	if err := checkVMDKGeometry(s, h); err != nil {
		return rep, err
	}
	rep.VirtualSize = size
	return rep, nil
}

const sugFlattenVMDK = "consolidate the snapshots (or clone the disk) in the hypervisor so that one standalone disk remains, and upload that"

// vmdkFooter validates the footer of a streamOptimized VMDK the way QEMU
// does: a footer marker, a copy of the header, and an end-of-stream marker
// in the last three sectors. A file cut short fails here.
func vmdkFooter(s *source, h vmdkHeader) (vmdkHeader, error) {
	if s.size < 4*512 {
		return h, refuse(events.RuleVMDKFooter, sugUploadAgain, "the streamOptimized VMDK is too short to hold the footer its header announces")
	}
	b, err := s.try(s.size-3*512, 3*512)
	if err != nil {
		return h, err
	}
	le := binary.LittleEndian
	marker, hdr, eos := b[:512], b[512:1024], b[1024:]
	if string(hdr[:4]) != "KDMV" ||
		le.Uint32(marker[8:]) != 0 || le.Uint32(marker[12:]) != vmdkMarkerFooter ||
		le.Uint64(eos[0:]) != 0 || le.Uint32(eos[8:]) != 0 || le.Uint32(eos[12:]) != vmdkMarkerEOS {
		return h, refuse(events.RuleVMDKFooter, sugUploadAgain,
			"the streamOptimized VMDK has no valid footer at its end; the file is probably truncated")
	}
	f := parseVMDKHeader(hdr)
	if f.gdOffset == vmdkGDAtEnd {
		return h, refuse(events.RuleVMDKFooter, sugReexport, "the VMDK footer points at yet another footer")
	}
	if f.version != h.version || f.descOffset != h.descOffset || f.descSize != h.descSize {
		return h, refuse(events.RuleVMDKFooter, sugReexport, "the VMDK footer disagrees with the header about the descriptor")
	}
	return f, nil
}

func checkVMDKGeometry(s *source, h vmdkHeader) error {
	if h.gtesPerGT > vmdkMaxGTEs {
		return refuse(events.RuleVMDKHeader, sugReexport, "the VMDK grain tables claim %d entries each, above the maximum %d", h.gtesPerGT, vmdkMaxGTEs)
	}
	if h.grain == 0 || h.grain > vmdkMaxGrain || h.gtesPerGT == 0 {
		return refuse(events.RuleVMDKHeader, sugReexport, "the VMDK grain geometry (grain %d sectors, %d entries per table) is invalid", h.grain, h.gtesPerGT)
	}
	perL1 := h.grain * uint64(h.gtesPerGT)
	l1 := h.capacity / perL1
	if h.capacity%perL1 != 0 {
		l1++
	}
	if l1 > vmdkMaxL1Entries {
		return refuse(events.RuleVMDKHeader, sugReexport,
			"the VMDK grain directory would need %d entries for its capacity, more than qemu allows", l1)
	}
	if h.grainOffset > uint64(s.size)/512 {
		return truncated(VMDK, fmt.Sprintf("grain data area (sector %d)", h.grainOffset))
	}
	return nil
}

type vmdkDescriptor struct {
	createType string
}

// parseDescriptor applies OpenStack's cautious reading of an embedded
// descriptor: every line must be a comment, a ddb entry, a key=value pair
// or an extent line, and there must be exactly one extent, a SPARSE one
// naming a plain file in the same directory.
func parseDescriptor(raw []byte) (vmdkDescriptor, error) {
	var d vmdkDescriptor
	if i := bytes.IndexByte(raw, 0); i >= 0 {
		raw = raw[:i]
	}
	var extents []string
	for line := range strings.SplitSeq(string(raw), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(strings.ToLower(line), "ddb."):
		case isExtentLine(line):
			extents = append(extents, line)
		case strings.Contains(line, "="):
			k, v, _ := strings.Cut(line, "=")
			k = strings.TrimSpace(k)
			if k == "" || strings.ContainsAny(k, " \t") {
				return d, badDescriptorLine(line)
			}
			v = strings.Trim(strings.TrimSpace(v), `"`)
			switch strings.ToLower(k) {
			case "createtype":
				d.createType = v
			case "parentcid":
				if !strings.EqualFold(v, "ffffffff") {
					return d, refuse(events.RuleDifferencingDisk, sugFlattenVMDK,
						"the VMDK is a delta disk of a parent (parentCID=%s) that is not part of the upload", printable([]byte(v)))
				}
			}
		default:
			return d, badDescriptorLine(line)
		}
	}
	if !strings.EqualFold(d.createType, "monolithicSparse") && !strings.EqualFold(d.createType, "streamOptimized") {
		what := "no createType"
		if d.createType != "" {
			what = "createType " + printable([]byte(d.createType))
		}
		return d, refuse(events.RuleVMDKCreateType, sugSingleVMDK,
			"the VMDK descriptor has %s; only monolithicSparse and streamOptimized are accepted", what)
	}
	if len(extents) != 1 {
		return d, refuse(events.RuleVMDKExtent, sugSingleVMDK,
			"the VMDK descriptor lists %d extents; a single-file VMDK has exactly one", len(extents))
	}
	f := strings.Fields(extents[0])
	if len(f) < 4 || !strings.EqualFold(f[2], vmdkExtentType) {
		return d, refuse(events.RuleVMDKExtent, sugSingleVMDK, "the VMDK extent %s is not a SPARSE extent", printable([]byte(extents[0])))
	}
	name, ok := extentName(extents[0])
	if !ok || name == "" || name == "." || name == ".." ||
		strings.ContainsAny(name, `/\:`) || strings.HasPrefix(strings.ToLower(name), "json:") {
		return d, refuse(events.RuleVMDKExtent, sugSingleVMDK,
			"the VMDK extent names the file %s, which is not a plain file name beside the image", printable([]byte(name)))
	}
	return d, nil
}

func isExtentLine(line string) bool {
	f := strings.Fields(line)
	if len(f) < 2 {
		return false
	}
	switch strings.ToUpper(f[0]) {
	case "RW", "RDONLY", "NOACCESS":
	default:
		return false
	}
	_, err := strconv.ParseUint(f[1], 10, 64)
	return err == nil
}

// extentName returns the quoted file name of an extent line.
func extentName(line string) (string, bool) {
	i := strings.IndexByte(line, '"')
	if i < 0 {
		return "", false
	}
	j := strings.IndexByte(line[i+1:], '"')
	if j < 0 {
		return "", false
	}
	return line[i+1 : i+1+j], true
}

func badDescriptorLine(line string) *Refusal {
	return refuse(events.RuleVMDKDescriptorSyntax, sugSingleVMDK,
		"the VMDK descriptor has a line this service does not understand: %s", printable([]byte(line)))
}

// looksLikeDescriptor reports whether head is a VMDK text descriptor, by
// its customary first line or by QEMU's own probe (comments and blank
// lines, then version=1 or version=2).
func looksLikeDescriptor(head []byte) bool {
	if bytes.HasPrefix(bytes.ToLower(head[:min(len(head), 21)]), []byte("# disk descriptorfile")) {
		return true
	}
	p := head
	for len(p) > 0 {
		switch p[0] {
		case '#':
			i := bytes.IndexByte(p, '\n')
			if i < 0 {
				return false
			}
			p = p[i+1:]
		case ' ', '\t', '\r', '\n':
			p = p[1:]
		default:
			for _, v := range []string{"version=1\n", "version=2\n", "version=1\r\n", "version=2\r\n"} {
				if bytes.HasPrefix(p, []byte(v)) {
					return true
				}
			}
			return false
		}
	}
	return false
}
