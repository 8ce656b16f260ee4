package inspect

import (
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/dustin/go-humanize"

	"github.com/imagepipe/imagepipe/events"
)

// qcow2 header fields, big-endian (docs/interop/qcow2.txt in QEMU).
const (
	qcowV2HeaderLen = 72
	qcowV3HeaderLen = 104

	qcowIncompatDirty       = 1 << 0
	qcowIncompatCorrupt     = 1 << 1
	qcowIncompatDataFile    = 1 << 2
	qcowIncompatCompression = 1 << 3
	qcowIncompatExtendedL2  = 1 << 4
	qcowIncompatKnown       = qcowIncompatDirty | qcowIncompatCorrupt | qcowIncompatDataFile |
		qcowIncompatCompression | qcowIncompatExtendedL2

	qcowExtEnd      = 0x00000000
	qcowExtDataFile = 0x44415441
	qcowExtCrypto   = 0x0537be77

	// QEMU's own ceilings (block/qcow2.h). Anything beyond them is refused
	// by qemu-img as well, after it has allocated memory for the claim.
	qcowMaxL1Bytes       = 32 << 20
	qcowMaxRefTableBytes = 8 << 20
	qcowMaxSnapshots     = 65536
	qcowMaxBackingName   = 1023
)

func inspectQcow(s *source, head []byte, lim Limits) (Report, error) {
	rep := Report{Format: Qcow2}
	if len(head) < 8 {
		return rep, truncated(Qcow2, "header")
	}
	be := binary.BigEndian
	version := be.Uint32(head[4:])
	switch version {
	case 1:
		detail := ""
		if len(head) >= 32 {
			detail = fmt.Sprintf(" (it claims a virtual size of %s)", humanize.IBytes(uint64(int64(min(be.Uint64(head[24:]), 1<<62)))))
		}
		return Report{}, refuse(events.RuleQcowV1, sugConvertFirst,
			"the file is a QCOW version 1 image%s; only qcow2 is accepted", detail)
	case 2, 3:
	default:
		return rep, refuse(events.RuleQcow2Header, sugReexport, "the qcow2 header has unknown version %d", version)
	}
	rep.Details = append(rep.Details, fmt.Sprintf("qcow2 v%d", version))

	hdrLen := uint32(qcowV2HeaderLen)
	if version == 3 {
		if len(head) < qcowV3HeaderLen {
			return rep, truncated(Qcow2, "header")
		}
		hdrLen = be.Uint32(head[100:])
		if hdrLen < qcowV3HeaderLen {
			return rep, refuse(events.RuleQcow2Header, sugReexport, "the qcow2 v3 header claims a length of %d bytes, less than the minimum %d", hdrLen, qcowV3HeaderLen)
		}
	}
	if len(head) < qcowV2HeaderLen {
		return rep, truncated(Qcow2, "header")
	}

	var (
		backingOff    = be.Uint64(head[8:])
		backingLen    = be.Uint32(head[16:])
		clusterBits   = be.Uint32(head[20:])
		virtualSize   = be.Uint64(head[24:])
		cryptMethod   = be.Uint32(head[32:])
		l1Size        = be.Uint32(head[36:])
		refTableClust = be.Uint32(head[56:])
		nbSnapshots   = be.Uint32(head[60:])
		incompat      uint64
	)
	if version == 3 {
		incompat = be.Uint64(head[72:])
	}
	// The size the header claims, so that a refusal still reports it;
	// checkSize below decides whether it is acceptable.
	if virtualSize <= 1<<62 {
		rep.VirtualSize = int64(virtualSize)
	}

	if backingOff != 0 {
		return rep, refuseQcowBacking(s, backingOff, backingLen)
	}
	if incompat&qcowIncompatDataFile != 0 {
		return rep, refuse(events.RuleDataFile, sugMergeDataFile,
			"the qcow2 image keeps its data in an external data file, which qemu-img would open from the host")
	}
	if unknown := incompat &^ qcowIncompatKnown; unknown != 0 {
		return rep, refuse(events.RuleQcow2UnknownFeature, "rewrite the image with a current qemu-img (qemu-img convert -O qcow2) and upload the result",
			"the qcow2 image sets incompatible feature bits this service does not know (%#x)", unknown)
	}
	if incompat&qcowIncompatCorrupt != 0 {
		return rep, refuse(events.RuleQcow2Corrupt, "repair a copy with qemu-img check -r all, or export the disk again, and upload the result",
			"the qcow2 image is marked corrupt by the program that wrote it")
	}
	if cryptMethod != 0 {
		return rep, refuse(events.RuleQcow2Encrypted, "decrypt the image where its key is known (qemu-img convert with --object secret) and upload the plain image",
			"the qcow2 image is encrypted (method %d)", cryptMethod)
	}
	if incompat&qcowIncompatDirty != 0 {
		rep.Details = append(rep.Details, "dirty: not closed cleanly")
	}
	if incompat&qcowIncompatExtendedL2 != 0 {
		rep.Details = append(rep.Details, "extended L2 entries")
	}

	if clusterBits < 9 || clusterBits > 21 {
		return rep, refuse(events.RuleQcow2Header, sugReexport, "the qcow2 cluster size 2^%d is outside the range qemu supports (2^9 to 2^21)", clusterBits)
	}
	clusterSize := uint64(1) << clusterBits
	if uint64(hdrLen) > clusterSize {
		return rep, refuse(events.RuleQcow2Header, sugReexport, "the qcow2 header (%d bytes) is larger than a cluster (%d bytes)", hdrLen, clusterSize)
	}
	if version == 3 {
		if order := be.Uint32(head[96:]); order > 6 {
			return rep, refuse(events.RuleQcow2Header, sugReexport, "the qcow2 refcount order %d is above the maximum 6", order)
		}
		if hdrLen > qcowV3HeaderLen && len(head) > qcowV3HeaderLen {
			switch ct := head[104]; ct {
			case 0:
			case 1:
				rep.Details = append(rep.Details, "compression type zstd")
			default:
				rep.Details = append(rep.Details, fmt.Sprintf("compression type %d", ct))
			}
		}
	}
	rep.Details = append(rep.Details, fmt.Sprintf("cluster size %d", clusterSize))

	size, err := checkSize(Qcow2, virtualSize, lim)
	if err != nil {
		return rep, err
	}
	rep.VirtualSize = size

	// Each L1 entry maps one L2 table's worth of clusters; the table must
	// cover the virtual size and must not exceed what qemu will allocate.
	l2Entries := clusterSize / 8
	if incompat&qcowIncompatExtendedL2 != 0 {
		l2Entries = clusterSize / 16
	}
	perL1 := clusterSize * l2Entries
	needL1 := virtualSize / perL1
	if virtualSize%perL1 != 0 {
		needL1++
	}
	if uint64(l1Size)*8 > qcowMaxL1Bytes {
		return rep, refuse(events.RuleQcow2L1Table, sugReexport, "the qcow2 L1 table claims %d entries, more than qemu allows", l1Size)
	}
	if uint64(l1Size) < needL1 {
		return rep, refuse(events.RuleQcow2L1Table, sugReexport,
			"the qcow2 L1 table has %d entries but the virtual size of %s needs %d", l1Size, humanize.IBytes(uint64(size)), needL1)
	}
	if uint64(refTableClust)*clusterSize > qcowMaxRefTableBytes {
		return rep, refuse(events.RuleQcow2Header, sugReexport, "the qcow2 refcount table claims %d clusters, more than qemu allows", refTableClust)
	}
	if nbSnapshots > qcowMaxSnapshots {
		return rep, refuse(events.RuleQcow2Snapshots, "delete internal snapshots with qemu-img snapshot -d, or convert the image, and upload the result",
			"the qcow2 image claims %d internal snapshots, more than qemu allows (%d)", nbSnapshots, qcowMaxSnapshots)
	}
	if nbSnapshots > 0 {
		rep.Details = append(rep.Details, fmt.Sprintf("%d internal snapshots (the active layer is converted)", nbSnapshots))
	}
	if err := checkQcowExtensions(s, head, hdrLen, clusterSize); err != nil {
		return rep, err
	}
	return rep, nil
}

const sugMergeDataFile = "merge the data file into the image where both are available (qemu-img convert -O qcow2 image.qcow2 standalone.qcow2) and upload the result"

func refuseQcowBacking(s *source, off uint64, n uint32) error {
	name := ""
	if n > 0 && off < uint64(s.size) {
		b, err := s.try(int64(off), int(min(n, qcowMaxBackingName)))
		if err != nil {
			return err
		}
		name = printable(b)
	}
	what := "a backing file"
	if name != "" {
		what = "the backing file " + name
	}
	if strings.HasPrefix(strings.Trim(name, `"`), "json:") {
		what = "a json: backing file specification " + name
	}
	return refuse(events.RuleBackingFile, sugFlatten,
		"the qcow2 image depends on %s, which qemu-img would open from the host", what)
}

// checkQcowExtensions walks the header extensions in the first cluster
// (capped at 64 KiB). The incompatible bit already decides whether qemu
// uses an external data file; a data-file name without it is refused too,
// because nothing legitimate writes one.
func checkQcowExtensions(s *source, head []byte, hdrLen uint32, clusterSize uint64) error {
	window := head
	if limit := min(clusterSize, 64<<10); uint64(len(head)) < limit && uint64(s.size) > uint64(len(head)) {
		b, err := s.try(0, int(limit))
		if err != nil {
			return err
		}
		window = b
	}
	if clusterSize < uint64(len(window)) {
		window = window[:clusterSize]
	}
	be := binary.BigEndian
	off := uint64(hdrLen)
	for off+8 <= uint64(len(window)) {
		typ := be.Uint32(window[off:])
		n := uint64(be.Uint32(window[off+4:]))
		if typ == qcowExtEnd {
			return nil
		}
		end := off + 8 + n
		switch typ {
		case qcowExtDataFile:
			name := ""
			if end <= uint64(len(window)) {
				name = " " + printable(window[off+8:end])
			}
			return refuse(events.RuleDataFile, sugMergeDataFile,
				"the qcow2 image names an external data file%s, which qemu-img would open from the host", name)
		case qcowExtCrypto:
			return refuse(events.RuleQcow2Encrypted, "decrypt the image where its key is known and upload the plain image",
				"the qcow2 image carries an encryption header")
		}
		off = end + (8-n%8)%8
	}
	return nil
}
