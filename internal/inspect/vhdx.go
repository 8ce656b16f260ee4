package inspect

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"hash/crc32"
	"io"
	"strings"

	"github.com/imagepipe/imagepipe/events"
)

// VHDX layout, little-endian ([MS-VHDX]): file identifier at 0, two 4 KiB
// headers at 64 KiB and 128 KiB, two 64 KiB region tables at 192 KiB and
// 256 KiB, and a metadata region located by the region table.
const (
	vhdxHeader1      = 64 << 10
	vhdxHeader2      = 128 << 10
	vhdxHeaderSize   = 4 << 10
	vhdxRegionTable1 = 192 << 10
	vhdxRegionTable2 = 256 << 10
	vhdxRegionSize   = 64 << 10
	// Both tables hold at most 2047 entries after a 32-byte (metadata) or
	// 16-byte (region) header, so 64 KiB always covers them.
	vhdxMaxEntries   = 2047
	vhdxMetaTableLen = 64 << 10
	vhdxMinSize      = vhdxRegionTable2 + vhdxRegionSize

	vhdxFlagLeaveAllocated = 1 << 0
	vhdxFlagHasParent      = 1 << 1
	vhdxMetaIsRequired     = 1 << 2
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// guid encodes a GUID in its on-disk form: the first three fields are
// little-endian, the rest is bytes in order.
func guid(s string) [16]byte {
	h, err := hex.DecodeString(strings.ReplaceAll(s, "-", ""))
	if err != nil || len(h) != 16 {
		panic("inspect: bad GUID literal " + s)
	}
	var g [16]byte
	g[0], g[1], g[2], g[3] = h[3], h[2], h[1], h[0]
	g[4], g[5] = h[5], h[4]
	g[6], g[7] = h[7], h[6]
	copy(g[8:], h[8:])
	return g
}

var (
	vhdxRegionBAT      = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
	vhdxRegionMetadata = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")

	vhdxItemFileParams   = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
	vhdxItemVirtualSize  = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
	vhdxItemPage83       = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
	vhdxItemLogicalSect  = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
	vhdxItemPhysicalSect = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
	vhdxItemParentLoc    = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
)

const sugMergeVHDX = "merge the checkpoint into its parent in Hyper-V (delete the checkpoint, or Edit Disk, Merge) and upload the merged .vhdx"

func vhdxChecksumOK(b []byte) bool {
	want := binary.LittleEndian.Uint32(b[4:])
	c := make([]byte, len(b))
	copy(c, b)
	clear(c[4:8])
	return crc32.Checksum(c, castagnoli) == want
}

func inspectVHDX(s *source) (Report, error) {
	rep := Report{Format: VHDX}
	if s.size < vhdxMinSize {
		return rep, truncated(VHDX, "headers and region tables")
	}
	le := binary.LittleEndian

	// The header with the higher sequence number among the valid ones is
	// current; the other is what a crash left behind.
	var current []byte
	var seq uint64
	for _, off := range []int64{vhdxHeader1, vhdxHeader2} {
		h, err := s.try(off, vhdxHeaderSize)
		if err != nil {
			return rep, err
		}
		if string(h[:4]) != "head" || !vhdxChecksumOK(h) {
			continue
		}
		if n := le.Uint64(h[8:]); current == nil || n > seq {
			current, seq = h, n
		}
	}
	if current == nil {
		return rep, refuse(events.RuleVHDXHeaderChecksum, sugRepairVHDX,
			"neither VHDX header has a valid signature and CRC-32C checksum")
	}
	if v := le.Uint16(current[66:]); v != 1 {
		return rep, refuse(events.RuleVHDXHeader, sugReexport, "the VHDX header has unsupported version %d", v)
	}
	if !allZero(current[48:64]) {
		rep.Details = append(rep.Details, "log not replayed (the disk was not closed cleanly)")
	}

	var table []byte
	for _, off := range []int64{vhdxRegionTable1, vhdxRegionTable2} {
		t, err := s.try(off, vhdxRegionSize)
		if err != nil {
			return rep, err
		}
		if string(t[:4]) == "regi" && vhdxChecksumOK(t) {
			table = t
			break
		}
	}
	if table == nil {
		return rep, refuse(events.RuleVHDXHeaderChecksum, sugRepairVHDX,
			"neither VHDX region table has a valid signature and CRC-32C checksum")
	}
	count := le.Uint32(table[8:])
	if count > vhdxMaxEntries {
		return rep, refuse(events.RuleVHDXHeader, sugReexport, "the VHDX region table claims %d entries", count)
	}
	var metaOff, batOff uint64
	var metaLen, batLen uint32
	for i := range count {
		e := table[16+32*i : 16+32*(i+1)]
		id := [16]byte(e[:16])
		switch id {
		case vhdxRegionMetadata:
			metaOff, metaLen = le.Uint64(e[16:]), le.Uint32(e[24:])
		case vhdxRegionBAT:
			batOff, batLen = le.Uint64(e[16:]), le.Uint32(e[24:])
		default:
			if le.Uint32(e[28:])&1 != 0 {
				return rep, refuse(events.RuleVHDXHeader, sugReexport, "the VHDX requires a region this service does not know")
			}
		}
	}
	if metaOff == 0 {
		return rep, refuse(events.RuleVHDXHeader, sugReexport, "the VHDX region table has no metadata region")
	}
	if uint64(metaLen) < vhdxMetaTableLen {
		return rep, refuse(events.RuleVHDXHeader, sugReexport, "the VHDX metadata region is only %d bytes long", metaLen)
	}
	meta, err := s.needAt(VHDX, metaOff, vhdxMetaTableLen, "metadata region", "metadata table")
	if err != nil {
		return rep, err
	}
	if string(meta[:8]) != "metadata" {
		return rep, refuse(events.RuleVHDXHeader, sugReexport, "the VHDX metadata region lacks its signature")
	}
	n := le.Uint16(meta[10:])
	if n > vhdxMaxEntries {
		return rep, refuse(events.RuleVHDXHeader, sugReexport, "the VHDX metadata table claims %d entries", n)
	}

	// item reads a small metadata item; offsets are relative to the region.
	item := func(off, length uint32, want int) ([]byte, error) {
		if length < uint32(want) || uint64(off)+uint64(want) > uint64(metaLen) {
			return nil, refuse(events.RuleVHDXHeader, sugReexport, "a VHDX metadata item lies outside the metadata region")
		}
		return s.need(VHDX, int64(metaOff)+int64(off), want, "metadata item")
	}
	var (
		fileParams, vsize []byte
		logicalSector     uint32
	)
	for i := range int(n) {
		e := meta[32+32*i : 32+32*(i+1)]
		id := [16]byte(e[:16])
		off, length, flags := le.Uint32(e[16:]), le.Uint32(e[20:]), le.Uint32(e[24:])
		switch id {
		case vhdxItemParentLoc:
			return rep, refuse(events.RuleDifferencingDisk, sugMergeVHDX,
				"the VHDX is a differencing disk (it has a parent locator): its data depends on a parent disk that is not part of the upload")
		case vhdxItemFileParams:
			if fileParams, err = item(off, length, 8); err != nil {
				return rep, err
			}
		case vhdxItemVirtualSize:
			if vsize, err = item(off, length, 8); err != nil {
				return rep, err
			}
		case vhdxItemLogicalSect:
			b, err := item(off, length, 4)
			if err != nil {
				return rep, err
			}
			logicalSector = le.Uint32(b)
		case vhdxItemPage83, vhdxItemPhysicalSect:
		default:
			if flags&vhdxMetaIsRequired != 0 {
				return rep, refuse(events.RuleVHDXHeader, sugReexport, "the VHDX requires a metadata item this service does not know")
			}
		}
	}
	if fileParams == nil || vsize == nil {
		return rep, refuse(events.RuleVHDXHeader, sugReexport, "the VHDX metadata lacks its file parameters or virtual disk size")
	}
	block, flags := le.Uint32(fileParams), le.Uint32(fileParams[4:])
	if flags&vhdxFlagHasParent != 0 {
		return rep, refuse(events.RuleDifferencingDisk, sugMergeVHDX,
			"the VHDX is a differencing disk (a Hyper-V checkpoint): its data depends on a parent disk that is not part of the upload")
	}
	if block < 1<<20 || block > 256<<20 || block&(block-1) != 0 {
		return rep, refuse(events.RuleVHDXHeader, sugReexport, "the VHDX block size %d is outside 1 MiB to 256 MiB", block)
	}
	if logicalSector != 0 && logicalSector != 512 && logicalSector != 4096 {
		return rep, refuse(events.RuleVHDXHeader, sugReexport, "the VHDX logical sector size %d is neither 512 nor 4096", logicalSector)
	}
	if flags&vhdxFlagLeaveAllocated != 0 {
		rep.Details = append(rep.Details, "vhdx fixed")
	} else {
		rep.Details = append(rep.Details, "vhdx dynamic")
	}
	rep.Details = append(rep.Details, fmt.Sprintf("block size %d", block))
	size, err := checkSize(VHDX, le.Uint64(vsize), Limits{})
	if err != nil {
		return rep, err
	}
	rep.VirtualSize = size
	// A log not replayed may hold newer table entries than the file's own
	// table: such a disk's stored data is not counted.
	if allZero(current[48:64]) {
		rep.vhdx = &vhdxLayout{bat: batOff, batLen: uint64(batLen), block: int64(block), sector: int64(logicalSector), size: size}
	}
	return rep, nil
}

// vhdxLayout is what it takes to read a VHDX's block allocation table:
// one 8-byte entry per payload block, with a sector bitmap entry after
// each chunk of payload entries ([MS-VHDX] 2.5).
type vhdxLayout struct {
	bat, batLen         uint64
	block, sector, size int64
}

// BAT entry states that read as zeros in qemu's driver (block/vhdx.c):
// not present, undefined, zero, unmapped and its draft value 5. Every
// other state is data, or an error.
const vhdxZeroStates = 1<<0 | 1<<1 | 1<<2 | 1<<3 | 1<<5

// storedData counts the payload blocks whose BAT entries say they hold
// data, each in full whatever file offset it names: blocks that share
// bytes count once each, so the count bounds what qemu-img writes.
func (l *vhdxLayout) storedData(f io.ReaderAt) (int64, bool) {
	if l.bat == 0 || l.sector == 0 {
		return 0, false
	}
	chunk := (1 << 23) * l.sector / l.block // payload entries per sector bitmap entry
	blocks := (l.size + l.block - 1) / l.block
	entries := blocks + (blocks-1)/chunk
	if uint64(entries)*8 > l.batLen {
		return 0, false // a table too short for the disk, which qemu-img refuses
	}
	buf := make([]byte, 1<<20)
	var n int64
	for first := int64(0); first < entries; {
		k := min(entries-first, int64(len(buf)/8))
		if _, err := f.ReadAt(buf[:k*8], int64(l.bat)+first*8); err != nil {
			return 0, false
		}
		for i := first; i < first+k; i++ {
			if (i+1)%(chunk+1) == 0 {
				continue // a sector bitmap entry
			}
			if state := binary.LittleEndian.Uint64(buf[(i-first)*8:]) & 7; vhdxZeroStates&(1<<state) == 0 {
				payload := i - i/(chunk+1)
				n += min(l.block, l.size-payload*l.block)
			}
		}
		first += k
	}
	return n, true
}

const sugRepairVHDX = "the VHDX headers are damaged; check the disk with Hyper-V Manager (Edit Disk) or export it again, and upload the new file"

func allZero(b []byte) bool {
	return len(bytes.Trim(b, "\x00")) == 0
}
