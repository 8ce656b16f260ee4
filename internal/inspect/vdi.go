package inspect

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/imagepipe/imagepipe/events"
)

// VirtualBox VDI, little-endian: a 64-byte text banner, the signature at
// 0x40, and a version 1.1 header after it (QEMU's block/vdi.c).
const (
	vdiSignature  = 0xbeda107f
	vdiVersion11  = 0x00010001
	vdiHeaderSize = 512

	vdiTypeDynamic      = 1
	vdiTypeStatic       = 2
	vdiTypeUndo         = 3
	vdiTypeDifferencing = 4
)

const sugMergeVDI = "clone the disk with VBoxManage clonemedium, which merges its snapshot chain into one standalone disk, and upload the clone"

func inspectVDI(head []byte) (Report, error) {
	rep := Report{Format: VDI}
	if len(head) < vdiHeaderSize {
		return rep, truncated(VDI, "header")
	}
	le := binary.LittleEndian
	if v := le.Uint32(head[0x44:]); v != vdiVersion11 {
		return rep, refuse(events.RuleVDIHeader, sugReexport, "the VDI header has unsupported version %d.%d", v>>16, v&0xffff)
	}
	var (
		imageType = le.Uint32(head[0x4c:])
		diskSize  = le.Uint64(head[0x170:])
		blockSize = le.Uint32(head[0x178:])
		blocks    = le.Uint32(head[0x180:])
		linkUUID  = head[0x1a8:0x1b8]
		parentMod = head[0x1b8:0x1c8]
	)
	switch imageType {
	case vdiTypeDynamic:
		rep.Details = append(rep.Details, "vdi dynamic")
	case vdiTypeStatic:
		rep.Details = append(rep.Details, "vdi fixed")
	case vdiTypeDifferencing, vdiTypeUndo:
		return rep, refuse(events.RuleDifferencingDisk, sugMergeVDI,
			"the VDI is a differencing disk (image type %d): its data depends on a parent disk that is not part of the upload", imageType)
	default:
		return rep, refuse(events.RuleVDIHeader, sugReexport, "the VDI header has unknown image type %d", imageType)
	}
	// QEMU refuses a linked image too, but only with a terse message; the
	// parent is the real reason.
	if !allZero(linkUUID) || !allZero(parentMod) {
		return rep, refuse(events.RuleDifferencingDisk, sugMergeVDI,
			"the VDI names a parent image: its data depends on a parent disk that is not part of the upload")
	}
	if blockSize == 0 || diskSize > uint64(blocks)*uint64(blockSize) {
		return rep, refuse(events.RuleVDIHeader, sugReexport,
			"the VDI disk size %d does not fit its %d blocks of %d bytes", diskSize, blocks, blockSize)
	}
	banner, _, _ := bytes.Cut(head[:0x40], []byte("\n"))
	if b := strings.TrimRight(string(banner), "\x00"); b != "" && isPrintableASCII(b) {
		rep.Details = append(rep.Details, b)
	}
	rep.Details = append(rep.Details, fmt.Sprintf("block size %d", blockSize))
	size, err := checkSize(VDI, diskSize, Limits{})
	if err != nil {
		return rep, err
	}
	rep.VirtualSize = size
	return rep, nil
}
