package inspect

import (
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/imagepipe/imagepipe/events"
)

// VHD (qemu's "vpc"): a big-endian 512-byte footer at the end of the file,
// copied to the start of dynamic and differencing disks, which also have a
// 1024-byte "cxsparse" dynamic header (Microsoft's Virtual Hard Disk Image
// Format Specification).
const (
	vpcFooterSize    = 512
	vpcDynHeaderSize = 1024

	vpcTypeFixed        = 2
	vpcTypeDynamic      = 3
	vpcTypeDifferencing = 4

	// vpcMaxTableEntries bounds the block allocation table: a 2040 GiB disk
	// (the format's maximum) in 512 KiB blocks needs about 4 million
	// entries, while QEMU would allocate up to 2 GiB for whatever is claimed.
	vpcMaxTableEntries = 1 << 24
)

// vpcChecksum is the one's complement of the byte sum with the checksum
// field (at off) taken as zero.
func vpcChecksum(b []byte, off int) uint32 {
	var sum uint32
	for i, c := range b {
		if i >= off && i < off+4 {
			continue
		}
		sum += uint32(c)
	}
	return ^sum
}

const sugMergeVHD = "merge the differencing disk into its parent (Hyper-V Manager: Edit Disk, Merge; or qemu-img commit beside the parent) and upload the merged disk"

func inspectVPC(s *source, footer []byte, lim Limits) (Report, error) {
	rep := Report{Format: VPC}
	if len(footer) < vpcFooterSize {
		return rep, truncated(VPC, "footer")
	}
	be := binary.BigEndian
	if want := be.Uint32(footer[64:]); vpcChecksum(footer, 64) != want {
		return rep, refuse(events.RuleVPCChecksum, sugReexport,
			"the VHD footer has an incorrect checksum, so none of its fields can be trusted")
	}
	var (
		dataOffset  = be.Uint64(footer[16:])
		creator     = footer[28:32]
		currentSize = be.Uint64(footer[48:])
		cyls        = uint64(be.Uint16(footer[56:]))
		heads       = uint64(footer[58])
		secs        = uint64(footer[59])
		diskType    = be.Uint32(footer[60:])
	)
	switch diskType {
	case vpcTypeFixed:
		rep.Details = append(rep.Details, "vpc fixed")
	case vpcTypeDynamic:
		rep.Details = append(rep.Details, "vpc dynamic")
	case vpcTypeDifferencing:
		return rep, refuse(events.RuleDifferencingDisk, sugMergeVHD,
			"the VHD is a differencing disk: its data depends on a parent disk that is not part of the upload")
	default:
		return rep, refuse(events.RuleVPCHeader, sugReexport, "the VHD footer has unknown disk type %d", diskType)
	}
	if c := strings.TrimRight(string(creator), "\x00 "); c != "" && isPrintableASCII(c) {
		rep.Details = append(rep.Details, fmt.Sprintf("creator %q", c))
	}

	if diskType == vpcTypeDynamic {
		dyn, err := s.needAt(VPC, dataOffset, vpcDynHeaderSize, "dynamic disk header", "dynamic disk header")
		if err != nil {
			return rep, err
		}
		if string(dyn[:8]) != "cxsparse" {
			return rep, refuse(events.RuleVPCHeader, sugReexport, "the VHD footer announces a dynamic disk but its dynamic header is missing")
		}
		entries := be.Uint32(dyn[28:])
		block := be.Uint32(dyn[32:])
		if block < 512 || block&(block-1) != 0 {
			return rep, refuse(events.RuleVPCHeader, sugReexport, "the VHD block size %d is not a power of two of at least 512", block)
		}
		if entries > vpcMaxTableEntries {
			return rep, refuse(events.RuleVPCHeader, sugReexport, "the VHD block allocation table claims %d entries", entries)
		}
		rep.Details = append(rep.Details, fmt.Sprintf("block size %d", block))
	}

	size, err := checkSize(VPC, currentSize, lim)
	if err != nil {
		return rep, err
	}
	rep.VirtualSize = size
	// QEMU sizes disks from some creators by their CHS geometry instead of
	// the current size, so such a geometry must fit the limit too.
	if chs := cyls * heads * secs * 512; chs > currentSize && vpcUsesCHS(creator, cyls*heads*secs) {
		if _, err := checkSize(VPC, chs, lim); err != nil {
			return rep, err
		}
		rep.Details = append(rep.Details, fmt.Sprintf("geometry size %d", chs))
	}
	return rep, nil
}

// vpcUsesCHS mirrors QEMU's choice (block/vpc.c): Virtual PC and old QEMU
// size a disk by its geometry, Hyper-V and most converters by the current
// size, and a geometry at its maximum means the size did not fit in it.
func vpcUsesCHS(creator []byte, sectors uint64) bool {
	const maxGeometry = 65535 * 16 * 255
	if sectors == maxGeometry {
		return false
	}
	switch string(creator) {
	case "win ", "qem2", "d2v ", "CTXS", "tap\x00":
		return false
	}
	return true
}

func isPrintableASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}
