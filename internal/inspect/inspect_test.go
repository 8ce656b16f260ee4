package inspect

import (
	"archive/tar"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"testing/iotest"

	"github.com/imagepipe/imagepipe/internal/inspect/ovatest"
)

func TestInspectDetectsAcceptedFormats(t *testing.T) {
	requireQemu(t)
	cases := []struct {
		name   string
		file   string
		format string
		opts   []string
		want   Format
		detail string
	}{
		{"qcow2 v2", "a.qcow2", "qcow2", []string{"-o", "compat=0.10"}, Qcow2, "qcow2 v2"},
		{"qcow2 v3", "a.qcow2", "qcow2", nil, Qcow2, "qcow2 v3"},
		{"qcow2 v3 zstd extended L2", "a.qcow2", "qcow2", []string{"-o", "compression_type=zstd,extended_l2=on,cluster_size=128k"}, Qcow2, "compression type zstd"},
		{"vhdx dynamic", "a.vhdx", "vhdx", nil, VHDX, "vhdx dynamic"},
		{"vhdx fixed", "a.vhdx", "vhdx", []string{"-o", "subformat=fixed"}, VHDX, "vhdx fixed"},
		{"vpc dynamic", "a.vhd", "vpc", nil, VPC, "vpc dynamic"},
		{"vpc fixed", "a.vhd", "vpc", []string{"-o", "subformat=fixed"}, VPC, "vpc fixed"},
		{"vpc fixed sized by current size", "a.vhd", "vpc", []string{"-o", "subformat=fixed,force_size=on"}, VPC, "vpc fixed"},
		{"vdi dynamic", "a.vdi", "vdi", nil, VDI, "vdi dynamic"},
		{"vdi static", "a.vdi", "vdi", []string{"-o", "static=on"}, VDI, "vdi fixed"},
		{"vmdk monolithicSparse", "a.vmdk", "vmdk", nil, VMDK, "vmdk createType=monolithicSparse"},
		{"vmdk streamOptimized", "a.vmdk", "vmdk", []string{"-o", "subformat=streamOptimized"}, VMDK, "vmdk createType=streamOptimized"},
		{"raw", "a.img", "raw", nil, Raw, "raw"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := makeImage(t, dir, tc.file, tc.format, "16M", tc.opts...)
			writePattern(t, dir, tc.file, tc.format)
			info := qemuInfo(t, dir, tc.file, tc.format)
			var qi struct {
				VirtualSize int64 `json:"virtual-size"`
			}
			if err := json.Unmarshal(info, &qi); err != nil {
				t.Fatal(err)
			}

			rep, err := InspectFile(path, Limits{})
			if err != nil {
				t.Fatalf("Inspect: %v", err)
			}
			if rep.Format != tc.want {
				t.Errorf("format = %s, want %s", rep.Format, tc.want)
			}
			if rep.VirtualSize != qi.VirtualSize {
				t.Errorf("virtual size = %d, qemu-img says %d", rep.VirtualSize, qi.VirtualSize)
			}
			if !slices.Contains(rep.Details, tc.detail) {
				t.Errorf("details %q lack %q", rep.Details, tc.detail)
			}

			// qemu-img was given the relative name, so that is the path
			// its report must name.
			got, err := CheckQemuInfo(rep, info, tc.file, Limits{})
			if err != nil {
				t.Fatalf("CheckQemuInfo: %v\n%s", err, info)
			}
			if got != qi.VirtualSize {
				t.Errorf("CheckQemuInfo size = %d, want %d", got, qi.VirtualSize)
			}

			// One byte under the claimed size is over the limit, in both checks.
			lim := Limits{MaxVirtualSize: qi.VirtualSize - 1}
			_, err = InspectFile(path, lim)
			wantRefusal(t, err, "virtual-size")
			_, err = CheckQemuInfo(rep, info, tc.file, lim)
			wantRefusal(t, err, "virtual-size")
			if _, err := InspectFile(path, Limits{MaxVirtualSize: qi.VirtualSize}); err != nil {
				t.Errorf("a size equal to the limit is refused: %v", err)
			}
		})
	}
}

func TestInspectDetectsOVA(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	disk := readFile(t, makeImage(t, dir, "disk.vmdk", "vmdk", "1M", "-o", "subformat=streamOptimized"))
	d := ovatest.Member{Name: "app-disk1.vmdk", Body: disk}
	path := writeFile(t, filepath.Join(dir, "app.ova"), makeTar(t,
		tarMember{name: "app.ovf", body: ovatest.OVF(d)},
		tarMember{name: "app.mf", body: ovatest.Manifest([]ovatest.Member{d}, nil)},
		tarMember{name: d.Name, body: disk},
	))
	rep, err := InspectFile(path, Limits{MaxVirtualSize: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Format != OVA || rep.VirtualSize != 0 {
		t.Errorf("got %s of %d bytes, want ova of unknown size", rep.Format, rep.VirtualSize)
	}
	want := `ova members: "app.ovf", "app.mf", "app-disk1.vmdk"`
	if !slices.Contains(rep.Details, want) {
		t.Errorf("details %q lack %q", rep.Details, want)
	}
}

func TestInspectAcceptsRawDisks(t *testing.T) {
	mbr := make([]byte, 1<<20)
	entry := mbr[446:]
	entry[0] = 0x80
	entry[4] = 0x83
	binary.LittleEndian.PutUint32(entry[8:], 2048)
	binary.LittleEndian.PutUint32(entry[12:], 2048)
	mbr[510], mbr[511] = 0x55, 0xaa

	gpt := bytes.Clone(mbr)
	gpt[446+4] = 0xee
	binary.LittleEndian.PutUint32(gpt[446+8:], 1)
	copy(gpt[512:], "EFI PART")

	cases := []struct {
		name   string
		data   []byte
		detail string
	}{
		{"empty", nil, "raw"},
		{"zeros", make([]byte, 4096), "raw"},
		{"mbr", mbr, "MBR partition table"},
		{"gpt", gpt, "GPT partition table"},
		{"boot signature without partitions", append(make([]byte, 510), 0x55, 0xaa), "raw"},
		{"stray VDI signature in boot code", append(append(make([]byte, 0x40), le32(vdiSignature)...), make([]byte, 1024)...), "raw"},
		{"qcow2 magic past the first byte", append([]byte{0}, "QFI\xfb"...), "raw"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rep, err := Inspect(bytes.NewReader(tc.data), int64(len(tc.data)), Limits{})
			if err != nil {
				t.Fatal(err)
			}
			if rep.Format != Raw || rep.VirtualSize != int64(len(tc.data)) {
				t.Errorf("got %s of %d bytes, want raw of %d", rep.Format, rep.VirtualSize, len(tc.data))
			}
			if !slices.Contains(rep.Details, tc.detail) {
				t.Errorf("details %q lack %q", rep.Details, tc.detail)
			}
		})
	}
}

// hostile builds a refused image in dir and returns its path.
type hostile struct {
	name  string
	build func(t *testing.T, dir string) string
	rule  string
	lim   Limits
}

func qcow2Fixture(t *testing.T, dir string, opts ...string) string {
	path := makeImage(t, dir, "a.qcow2", "qcow2", "16M", opts...)
	writePattern(t, dir, "a.qcow2", "qcow2")
	return path
}

func vmdkFixture(t *testing.T, dir string, opts ...string) string {
	return makeImage(t, dir, "a.vmdk", "vmdk", "16M", opts...)
}

func TestInspectRefusesHostileQcow2(t *testing.T) {
	requireQemu(t)
	run(t, []hostile{
		{"WithBackingFile", func(t *testing.T, dir string) string {
			makeImage(t, dir, "base.qcow2", "qcow2", "16M")
			return makeImage(t, dir, "top.qcow2", "qcow2", "16M", "-b", "base.qcow2", "-F", "qcow2")
		}, "backing-file", Limits{}},
		{"WithJSONBackingFile", func(t *testing.T, dir string) string {
			makeImage(t, dir, "base.qcow2", "qcow2", "16M")
			path := makeImage(t, dir, "top.qcow2", "qcow2", "16M", "-b", "base.qcow2", "-F", "qcow2")
			off := binary.BigEndian.Uint64(readFile(t, path)[8:])
			spec := `json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}`
			patchFile(t, path, int64(off), []byte(spec))
			patchFile(t, path, 16, be32(uint32(len(spec))))
			return path
		}, "backing-file", Limits{}},
		{"WithDataFile", func(t *testing.T, dir string) string {
			return makeImage(t, dir, "a.qcow2", "qcow2", "16M", "-o", "data_file=a.data")
		}, "data-file", Limits{}},
		{"WithDataFileNameButNoFeatureBit", func(t *testing.T, dir string) string {
			path := makeImage(t, dir, "a.qcow2", "qcow2", "16M", "-o", "data_file=a.data")
			patchFile(t, path, 72, be64(0))
			return path
		}, "data-file", Limits{}},
		{"WithUnknownIncompatibleFeature", func(t *testing.T, dir string) string {
			path := qcow2Fixture(t, dir)
			patchFile(t, path, 72, be64(1<<10))
			return path
		}, "qcow2-unknown-feature", Limits{}},
		{"MarkedCorrupt", func(t *testing.T, dir string) string {
			path := qcow2Fixture(t, dir)
			patchFile(t, path, 72, be64(qcowIncompatCorrupt))
			return path
		}, "qcow2-corrupt", Limits{}},
		{"Encrypted", func(t *testing.T, dir string) string {
			path := qcow2Fixture(t, dir)
			patchFile(t, path, 32, be32(1))
			return path
		}, "qcow2-encrypted", Limits{}},
		{"ClaimingHugeVirtualSize", func(t *testing.T, dir string) string {
			path := qcow2Fixture(t, dir)
			patchFile(t, path, 24, be64(1<<62))
			return path
		}, "virtual-size", Limits{MaxVirtualSize: 1 << 40}},
		{"ClaimingSizeBeyondInt64", func(t *testing.T, dir string) string {
			path := qcow2Fixture(t, dir)
			patchFile(t, path, 24, be64(^uint64(0)))
			return path
		}, "virtual-size", Limits{}},
		{"WithL1TableTooSmallForItsSize", func(t *testing.T, dir string) string {
			path := qcow2Fixture(t, dir)
			patchFile(t, path, 24, be64(1<<50))
			return path
		}, "qcow2-l1-table", Limits{}},
		{"WithAbsurdL1Table", func(t *testing.T, dir string) string {
			path := qcow2Fixture(t, dir)
			patchFile(t, path, 36, be32(1<<30))
			return path
		}, "qcow2-l1-table", Limits{}},
		{"WithInvalidClusterSize", func(t *testing.T, dir string) string {
			path := qcow2Fixture(t, dir)
			patchFile(t, path, 20, be32(30))
			return path
		}, "qcow2-header", Limits{}},
		{"WithTooManySnapshots", func(t *testing.T, dir string) string {
			path := qcow2Fixture(t, dir)
			patchFile(t, path, 60, be32(70000))
			return path
		}, "qcow2-snapshots", Limits{}},
		{"WithUnknownVersion", func(t *testing.T, dir string) string {
			path := qcow2Fixture(t, dir)
			patchFile(t, path, 4, be32(4))
			return path
		}, "qcow2-header", Limits{}},
		{"TruncatedInV2Header", func(t *testing.T, dir string) string {
			return writeFile(t, filepath.Join(dir, "a.qcow2"), readFile(t, qcow2Fixture(t, dir, "-o", "compat=0.10"))[:50])
		}, "truncated-header", Limits{}},
		{"TruncatedInV3Header", func(t *testing.T, dir string) string {
			return writeFile(t, filepath.Join(dir, "b.qcow2"), readFile(t, qcow2Fixture(t, dir))[:90])
		}, "truncated-header", Limits{}},
		{"PolyglotWithGPT", func(t *testing.T, dir string) string {
			path := qcow2Fixture(t, dir)
			patchFile(t, path, 510, []byte{0x55, 0xaa})
			patchFile(t, path, 512, []byte("EFI PART"))
			return path
		}, "polyglot", Limits{}},
		{"PolyglotWithMBR", func(t *testing.T, dir string) string {
			path := qcow2Fixture(t, dir)
			table := make([]byte, 64)
			table[4] = 0x07
			binary.LittleEndian.PutUint32(table[8:], 2048)
			binary.LittleEndian.PutUint32(table[12:], 1<<20)
			patchFile(t, path, 446, table)
			patchFile(t, path, 510, []byte{0x55, 0xaa})
			return path
		}, "polyglot", Limits{}},
		{"PolyglotWithTar", func(t *testing.T, dir string) string {
			path := qcow2Fixture(t, dir)
			patchFile(t, path, 257, []byte("ustar\x0000"))
			return path
		}, "polyglot", Limits{}},
		{"PolyglotTarAndVDI", func(t *testing.T, dir string) string {
			path := writeFile(t, filepath.Join(dir, "a.ova"), makeTar(t,
				tarMember{name: "<<< Oracle VM VirtualBox Disk Image >>>", body: make([]byte, 1024)}))
			patchFile(t, path, 0x40, le32(vdiSignature))
			return path
		}, "polyglot", Limits{}},
		{"QcowVersion1", func(t *testing.T, dir string) string {
			return makeImage(t, dir, "a.qcow", "qcow", "16M")
		}, "qcow-v1", Limits{}},
		{"QED", func(t *testing.T, dir string) string {
			return makeImage(t, dir, "a.qed", "qed", "16M")
		}, "qed", Limits{}},
	})
}

func TestInspectRefusesHostileVMDK(t *testing.T) {
	requireQemu(t)
	withDescriptor := func(text string) func(t *testing.T, dir string) string {
		return func(t *testing.T, dir string) string {
			path := vmdkFixture(t, dir)
			rewriteDescriptor(t, path, text)
			return path
		}
	}
	run(t, []hostile{
		{"DescriptorFileWithHostExtent", func(t *testing.T, dir string) string {
			return writeFile(t, filepath.Join(dir, "a.vmdk"), []byte(
				sparseDescriptor("monolithicFlat", `RW 2048 FLAT "/etc/passwd" 0`)))
		}, "vmdk-descriptor", Limits{}},
		{"DescriptorFileWithoutHeaderLine", func(t *testing.T, dir string) string {
			return writeFile(t, filepath.Join(dir, "a.vmdk"), []byte("# made by hand\n\nversion=1\nRW 2048 FLAT \"/dev/sda\" 0\n"))
		}, "vmdk-descriptor", Limits{}},
		{"MonolithicFlat", func(t *testing.T, dir string) string {
			return vmdkFixture(t, dir, "-o", "subformat=monolithicFlat")
		}, "vmdk-descriptor", Limits{}},
		{"TwoGbMaxExtentSparse", func(t *testing.T, dir string) string {
			return vmdkFixture(t, dir, "-o", "subformat=twoGbMaxExtentSparse")
		}, "vmdk-descriptor", Limits{}},
		{"EmbeddedMonolithicFlat", withDescriptor(sparseDescriptor("monolithicFlat", `RW 32768 FLAT "a-flat.vmdk" 0`)), "vmdk-create-type", Limits{}},
		{"EmbeddedWithoutCreateType", withDescriptor("# Disk DescriptorFile\nversion=1\nRW 32768 SPARSE \"a.vmdk\"\n"), "vmdk-create-type", Limits{}},
		{"ExtentOutsideDirectory", withDescriptor(sparseDescriptor("monolithicSparse", `RW 32768 SPARSE "/etc/passwd"`)), "vmdk-extent", Limits{}},
		{"ExtentWithParentPath", withDescriptor(sparseDescriptor("monolithicSparse", `RW 32768 SPARSE "..\secret.vmdk"`)), "vmdk-extent", Limits{}},
		{"ExtentWithJSONName", withDescriptor(sparseDescriptor("monolithicSparse", `RW 32768 SPARSE "json:{}"`)), "vmdk-extent", Limits{}},
		{"FlatExtent", withDescriptor(sparseDescriptor("monolithicSparse", `RW 32768 FLAT "a.vmdk" 0`)), "vmdk-extent", Limits{}},
		{"TwoExtents", withDescriptor(sparseDescriptor("monolithicSparse", "RW 16384 SPARSE \"a.vmdk\"\nRW 16384 SPARSE \"b.vmdk\"")), "vmdk-extent", Limits{}},
		{"ParentFileNameHint", withDescriptor(sparseDescriptor("monolithicSparse", `RW 32768 SPARSE "a.vmdk"`, `parentFileNameHint="/etc/shadow"`)), "backing-file", Limits{}},
		{"ParentCID", withDescriptor(strings.Replace(sparseDescriptor("monolithicSparse", `RW 32768 SPARSE "a.vmdk"`), "parentCID=ffffffff", "parentCID=8a2c3f01", 1)), "differencing-disk", Limits{}},
		{"UnknownDescriptorLine", withDescriptor(sparseDescriptor("monolithicSparse", `RW 32768 SPARSE "a.vmdk"`, `!include "/etc/passwd"`)), "vmdk-descriptor-syntax", Limits{}},
		{"ParentHintOutsideDeclaredDescriptor", func(t *testing.T, dir string) string {
			path := vmdkFixture(t, dir)
			// The header's descriptor ends after 1 sector; QEMU still
			// searches 20 sectors for a parent.
			patchFile(t, path, 36, le64(1))
			patchFile(t, path, 512+3*512, []byte(`parentFileNameHint="/etc/shadow"`))
			return path
		}, "backing-file", Limits{}},
		{"ZeroCapacity", func(t *testing.T, dir string) string {
			path := vmdkFixture(t, dir)
			patchFile(t, path, 12, le64(0))
			return path
		}, "vmdk-extent", Limits{}},
		{"NoEmbeddedDescriptor", func(t *testing.T, dir string) string {
			path := vmdkFixture(t, dir)
			patchFile(t, path, 28, le64(0))
			return path
		}, "vmdk-create-type", Limits{}},
		{"HugeDescriptorElsewhere", func(t *testing.T, dir string) string {
			path := vmdkFixture(t, dir)
			patchFile(t, path, 28, le64(1<<40))
			patchFile(t, path, 36, le64(1<<40))
			return path
		}, "vmdk-header", Limits{}},
		{"OversizedGrainTables", func(t *testing.T, dir string) string {
			path := vmdkFixture(t, dir)
			patchFile(t, path, 44, le32(1024))
			return path
		}, "vmdk-header", Limits{}},
		{"ClaimingHugeCapacity", func(t *testing.T, dir string) string {
			path := vmdkFixture(t, dir)
			patchFile(t, path, 12, le64(1<<50))
			return path
		}, "virtual-size", Limits{MaxVirtualSize: 1 << 40}},
		{"GrainDirectoryTooLargeForQemu", func(t *testing.T, dir string) string {
			path := vmdkFixture(t, dir)
			patchFile(t, path, 12, le64(1<<50))
			return path
		}, "vmdk-header", Limits{}},
		{"StreamOptimizedWithoutFooter", func(t *testing.T, dir string) string {
			path := vmdkFixture(t, dir, "-o", "subformat=streamOptimized")
			patchFile(t, path, 56, le64(vmdkGDAtEnd))
			return path
		}, "vmdk-footer", Limits{}},
		{"Truncated", func(t *testing.T, dir string) string {
			return writeFile(t, filepath.Join(dir, "b.vmdk"), readFile(t, vmdkFixture(t, dir))[:300])
		}, "truncated-header", Limits{}},
		{"TruncatedBeforeGrains", func(t *testing.T, dir string) string {
			return writeFile(t, filepath.Join(dir, "b.vmdk"), readFile(t, vmdkFixture(t, dir))[:20<<10])
		}, "truncated-header", Limits{}},
		{"BareSESparse", func(t *testing.T, dir string) string {
			b := make([]byte, 64<<10)
			copy(b, le64(0xcafebabe))
			copy(b[8:], le64(0x200000001))
			return writeFile(t, filepath.Join(dir, "a-sesparse.vmdk"), b)
		}, "vmdk-sesparse", Limits{}},
		{"VMDK3", func(t *testing.T, dir string) string {
			b := make([]byte, 64<<10)
			copy(b, "COWD")
			return writeFile(t, filepath.Join(dir, "a.vmdk"), b)
		}, "vmdk-cowd", Limits{}},
	})
}

func TestInspectRefusesHostileVHDAndVHDX(t *testing.T) {
	requireQemu(t)
	vhd := func(t *testing.T, dir string, opts ...string) string {
		path := makeImage(t, dir, "a.vhd", "vpc", "16M", opts...)
		writePattern(t, dir, "a.vhd", "vpc")
		return path
	}
	vhdx := func(t *testing.T, dir string) string {
		path := makeImage(t, dir, "a.vhdx", "vhdx", "16M")
		writePattern(t, dir, "a.vhdx", "vhdx")
		return path
	}
	run(t, []hostile{
		{"DifferencingVHD", func(t *testing.T, dir string) string {
			path := vhd(t, dir)
			patchVPCFooters(t, path, 60, be32(vpcTypeDifferencing))
			return path
		}, "differencing-disk", Limits{}},
		{"VHDWithBadChecksum", func(t *testing.T, dir string) string {
			path := vhd(t, dir)
			patchFile(t, path, 48, be64(1<<30))
			return path
		}, "vpc-checksum", Limits{}},
		{"FixedVHDWithBadChecksum", func(t *testing.T, dir string) string {
			path := vhd(t, dir, "-o", "subformat=fixed")
			size := int64(len(readFile(t, path)))
			patchFile(t, path, size-512+48, be64(1<<30))
			return path
		}, "vpc-checksum", Limits{}},
		{"VHDWithUnknownDiskType", func(t *testing.T, dir string) string {
			path := vhd(t, dir)
			patchVPCFooters(t, path, 60, be32(9))
			return path
		}, "vpc-header", Limits{}},
		{"VHDWithoutDynamicHeader", func(t *testing.T, dir string) string {
			path := vhd(t, dir)
			patchFile(t, path, 512, []byte("notsparse"))
			return path
		}, "vpc-header", Limits{}},
		{"VHDWithAbsurdAllocationTable", func(t *testing.T, dir string) string {
			path := vhd(t, dir)
			patchFile(t, path, 512+28, be32(1<<30))
			return path
		}, "vpc-header", Limits{}},
		{"VHDClaimingHugeSize", func(t *testing.T, dir string) string {
			path := vhd(t, dir)
			patchVPCFooters(t, path, 48, be64(1<<50))
			return path
		}, "virtual-size", Limits{MaxVirtualSize: 1 << 40}},
		{"VHDXWithParentFlag", func(t *testing.T, dir string) string {
			path := vhdx(t, dir)
			_, data := vhdxMetadataEntry(t, path, vhdxItemFileParams)
			flags := binary.LittleEndian.Uint32(readFile(t, path)[data+4:])
			patchFile(t, path, data+4, le32(flags|vhdxFlagHasParent))
			return path
		}, "differencing-disk", Limits{}},
		{"VHDXWithParentLocator", func(t *testing.T, dir string) string {
			path := vhdx(t, dir)
			entry, _ := vhdxMetadataEntry(t, path, vhdxItemPage83)
			patchFile(t, path, entry, vhdxItemParentLoc[:])
			return path
		}, "differencing-disk", Limits{}},
		{"VHDXWithBothHeadersDamaged", func(t *testing.T, dir string) string {
			path := vhdx(t, dir)
			patchFile(t, path, vhdxHeader1+100, []byte{0xff})
			patchFile(t, path, vhdxHeader2+100, []byte{0xff})
			return path
		}, "vhdx-header-checksum", Limits{}},
		{"VHDXWithBothRegionTablesDamaged", func(t *testing.T, dir string) string {
			path := vhdx(t, dir)
			patchFile(t, path, vhdxRegionTable1+100, []byte{0xff})
			patchFile(t, path, vhdxRegionTable2+100, []byte{0xff})
			return path
		}, "vhdx-header-checksum", Limits{}},
		{"VHDXWithUnknownRequiredMetadata", func(t *testing.T, dir string) string {
			path := vhdx(t, dir)
			entry, _ := vhdxMetadataEntry(t, path, vhdxItemPage83)
			patchFile(t, path, entry, bytes.Repeat([]byte{0x42}, 16))
			patchFile(t, path, entry+24, le32(vhdxMetaIsRequired))
			return path
		}, "vhdx-header", Limits{}},
		{"VHDXClaimingHugeSize", func(t *testing.T, dir string) string {
			path := vhdx(t, dir)
			_, data := vhdxMetadataEntry(t, path, vhdxItemVirtualSize)
			patchFile(t, path, data, le64(1<<50))
			return path
		}, "virtual-size", Limits{MaxVirtualSize: 1 << 40}},
		{"TruncatedVHDX", func(t *testing.T, dir string) string {
			return writeFile(t, filepath.Join(dir, "b.vhdx"), readFile(t, vhdx(t, dir))[:100<<10])
		}, "truncated-header", Limits{}},
		{"VHDXTruncatedBeforeMetadata", func(t *testing.T, dir string) string {
			return writeFile(t, filepath.Join(dir, "b.vhdx"), readFile(t, vhdx(t, dir))[:1<<20])
		}, "truncated-header", Limits{}},
	})
}

func TestInspectRefusesHostileVDIAndOVA(t *testing.T) {
	requireQemu(t)
	vdi := func(t *testing.T, dir string) string {
		path := makeImage(t, dir, "a.vdi", "vdi", "16M")
		writePattern(t, dir, "a.vdi", "vdi")
		return path
	}
	run(t, []hostile{
		{"DifferencingVDI", func(t *testing.T, dir string) string {
			path := vdi(t, dir)
			patchFile(t, path, 0x4c, le32(vdiTypeDifferencing))
			return path
		}, "differencing-disk", Limits{}},
		{"VDIWithParent", func(t *testing.T, dir string) string {
			path := vdi(t, dir)
			patchFile(t, path, 0x1a8, bytes.Repeat([]byte{0x11}, 16))
			return path
		}, "differencing-disk", Limits{}},
		{"VDIClaimingMoreThanItsBlocks", func(t *testing.T, dir string) string {
			path := vdi(t, dir)
			patchFile(t, path, 0x170, le64(1<<40))
			return path
		}, "vdi-header", Limits{}},
		{"TruncatedVDI", func(t *testing.T, dir string) string {
			return writeFile(t, filepath.Join(dir, "b.vdi"), readFile(t, vdi(t, dir))[:0x100])
		}, "truncated-header", Limits{}},
		{"TarWithoutOVF", func(t *testing.T, dir string) string {
			disk := readFile(t, qcow2Fixture(t, dir))
			return writeFile(t, filepath.Join(dir, "a.tar"), makeTar(t, tarMember{name: "disk.qcow2", body: disk}))
		}, "ova-descriptor", Limits{}},
		{"OVAWithEscapingMember", func(t *testing.T, dir string) string {
			return writeFile(t, filepath.Join(dir, "a.ova"), makeTar(t,
				tarMember{name: "a.ovf", body: []byte(ovfText)},
				tarMember{name: "../../etc/cron.d/x", body: []byte("x")}))
		}, "ova-member-name", Limits{}},
		{"OVAWithSymlink", func(t *testing.T, dir string) string {
			return writeFile(t, filepath.Join(dir, "a.ova"), makeTar(t,
				tarMember{name: "a.ovf", body: []byte(ovfText)},
				tarMember{name: "disk.vmdk", typeflag: tar.TypeSymlink, link: "/etc/passwd"}))
		}, "ova-member", Limits{}},
		{"TruncatedOVA", func(t *testing.T, dir string) string {
			b := makeTar(t, tarMember{name: "a.ovf", body: []byte(ovfText)}, tarMember{name: "disk.vmdk", body: make([]byte, 8192)})
			return writeFile(t, filepath.Join(dir, "a.ova"), b[:3000])
		}, "truncated-header", Limits{}},
	})
}

func run(t *testing.T, cases []hostile) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := tc.build(t, t.TempDir())
			rep, err := InspectFile(path, tc.lim)
			ref := wantRefusal(t, err, tc.rule)
			if !strings.HasPrefix(ref.Error(), "refused by rule "+tc.rule+": ") {
				t.Errorf("Error() = %q", ref.Error())
			}
			t.Logf("%s (%s): %s", ref.Rule, rep.Format, ref.Reason)
		})
	}
}

func TestInspectReadsLittleWhateverTheHeaderClaims(t *testing.T) {
	// A VMDK header that claims a 1 GiB descriptor in a file that claims to
	// be a terabyte: the reader serves zeros, and the inspection must still
	// stop after a bounded amount.
	vmdk := make([]byte, 512)
	copy(vmdk, "KDMV")
	copy(vmdk[4:], le32(1))
	copy(vmdk[12:], le64(1<<21))
	copy(vmdk[20:], le64(128))
	copy(vmdk[28:], le64(1))
	copy(vmdk[36:], le64(1<<21))
	copy(vmdk[44:], le32(512))

	tarHead := makeTar(t, tarMember{name: "a.ovf", body: make([]byte, 1<<30>>10)})

	cases := []struct {
		name string
		data []byte
		size int64
	}{
		{"vmdk descriptor", vmdk, 1 << 40},
		{"vhdx", buildVHDX(1<<30, 0), 1 << 40},
		{"tar", tarHead[:1024], 1 << 40},
		{"raw", nil, 1 << 40},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := &countingReaderAt{data: tc.data, size: tc.size}
			_, err := Inspect(r, tc.size, Limits{})
			if r.read > readBudget {
				t.Errorf("read %d bytes, more than the budget of %d (err %v)", r.read, readBudget, err)
			}
			t.Logf("read %d bytes; %v", r.read, err)
		})
	}
}

func TestInspectWrapsReadErrors(t *testing.T) {
	boom := errors.New("disk on fire")
	r := iotest.ErrReader(boom)
	_, err := Inspect(readerAtFunc(func(p []byte, off int64) (int, error) { return r.Read(p) }), 1<<20, Limits{})
	var ref *Refusal
	if errors.As(err, &ref) || !errors.Is(err, boom) {
		t.Fatalf("want the read error wrapped, got %v", err)
	}

	short := bytes.NewReader(make([]byte, 100))
	_, err = Inspect(short, 1<<20, Limits{})
	if errors.As(err, &ref) || err == nil {
		t.Fatalf("a file shorter than its stated size must be an I/O error, got %v", err)
	}
}

type readerAtFunc func(p []byte, off int64) (int, error)

func (f readerAtFunc) ReadAt(p []byte, off int64) (int, error) { return f(p, off) }

func TestInspectFileReportsMissingFile(t *testing.T) {
	_, err := InspectFile(filepath.Join(t.TempDir(), "absent"), Limits{})
	var ref *Refusal
	if !errors.Is(err, os.ErrNotExist) || errors.As(err, &ref) {
		t.Fatalf("got %v", err)
	}
}

func TestInspectAcceptsCompactVHDX(t *testing.T) {
	b := buildVHDX(1<<30, vhdxFlagLeaveAllocated)
	rep, err := Inspect(bytes.NewReader(b), int64(len(b)), Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Format != VHDX || rep.VirtualSize != 1<<30 || !slices.Contains(rep.Details, "vhdx fixed") {
		t.Errorf("got %+v", rep)
	}
	b = buildVHDX(1<<30, vhdxFlagHasParent)
	_, err = Inspect(bytes.NewReader(b), int64(len(b)), Limits{})
	wantRefusal(t, err, "differencing-disk")
}

// A streamOptimized writer that cannot seek leaves the grain directory
// offset unknown in the header and writes the real header into a footer;
// qemu-img must agree with Inspect on such a file.
func TestInspectAcceptsStreamOptimizedFooter(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	path := makeImage(t, dir, "a.vmdk", "vmdk", "16M", "-o", "subformat=streamOptimized")
	b := readFile(t, path)
	header := bytes.Clone(b[:512])
	copy(b[56:], le64(vmdkGDAtEnd))
	marker := make([]byte, 512)
	copy(marker[12:], le32(vmdkMarkerFooter))
	b = append(b, marker...)
	b = append(b, header...)
	b = append(b, make([]byte, 512)...)
	writeFile(t, path, b)

	rep, err := InspectFile(path, Limits{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Format != VMDK || rep.VirtualSize != 16<<20 || !slices.Contains(rep.Details, "grain directory in footer") {
		t.Errorf("got %+v", rep)
	}
	if _, err := CheckQemuInfo(rep, qemuInfo(t, dir, "a.vmdk", "vmdk"), "a.vmdk", Limits{}); err != nil {
		t.Error(err)
	}
}
