package events

// Rules a failure names (Failed.Rule) when it refuses an input for good.
// Each is stable: dashboards, alerts and users' filters match on them,
// and `imagepipe inspect` prints them.

// RuleCancelled is the Rule of the failure event of a job an operator
// cancelled; statistics count such a job as neither a success nor a
// failure.
const RuleCancelled = "cancelled"

// Intake: ingest refuses an upload or an import before any job runs.
const (
	RuleExtension       = "extension"
	RuleImportAddress   = "import-address"
	RuleImportBusy      = "import-busy"
	RuleImportExists    = "import-exists"
	RuleImportHost      = "import-host"
	RuleImportIdle      = "import-idle"
	RuleImportPort      = "import-port"
	RuleImportRedirects = "import-redirects"
	RuleImportScheme    = "import-scheme"
	RuleImportSource    = "import-source"
	RuleImportTimeout   = "import-timeout"
	RuleMaxInputSize    = "max-input-size"
	RuleReservedKey     = "reserved-key"
	RuleSHA256Mismatch  = "sha256-mismatch"
	RuleUnsafeKey       = "unsafe-key"
)

// Download: convert refuses what the upload itself asks for.
const (
	RuleChecksum     = "checksum"
	RuleOutputFormat = "output-format"
)

// Inspect: the image, its container or its compression is refused by a
// safety check before qemu-img touches it (internal/inspect,
// internal/decompress, and the OVA members convert unpacks).
const (
	RuleBackingFile          = "backing-file"
	RuleCompressedStream     = "compressed-stream"
	RuleDataFile             = "data-file"
	RuleDecompressWindow     = "decompress-window"
	RuleDifferencingDisk     = "differencing-disk"
	RuleExtensionMismatch    = "extension-mismatch"
	RuleFormatMismatch       = "format-mismatch"
	RuleHeaderTooLarge       = "header-too-large"
	RuleOVADescriptor        = "ova-descriptor"
	RuleOVADisks             = "ova-disks"
	RuleOVADuplicateMember   = "ova-duplicate-member"
	RuleOVAManifest          = "ova-manifest"
	RuleOVAMember            = "ova-member"
	RuleOVAMemberName        = "ova-member-name"
	RuleOVAMemberSize        = "ova-member-size"
	RuleOVAMembers           = "ova-members"
	RuleOVANoDisk            = "ova-no-disk"
	RuleOVASize              = "ova-size"
	RuleOVASparse            = "ova-sparse"
	RuleOVAUndeclaredMember  = "ova-undeclared-member"
	RulePolyglot             = "polyglot"
	RuleProtocolFilename     = "protocol-filename"
	RuleQcowV1               = "qcow-v1"
	RuleQcow2Corrupt         = "qcow2-corrupt"
	RuleQcow2Encrypted       = "qcow2-encrypted"
	RuleQcow2Header          = "qcow2-header"
	RuleQcow2L1Table         = "qcow2-l1-table"
	RuleQcow2Snapshots       = "qcow2-snapshots"
	RuleQcow2UnknownFeature  = "qcow2-unknown-feature"
	RuleQED                  = "qed"
	RuleScratchSpace         = "scratch-space"
	RuleTruncatedHeader      = "truncated-header"
	RuleVDIHeader            = "vdi-header"
	RuleVHDXHeader           = "vhdx-header"
	RuleVHDXHeaderChecksum   = "vhdx-header-checksum"
	RuleVirtualSize          = "virtual-size"
	RuleVMDKCOWD             = "vmdk-cowd"
	RuleVMDKCreateType       = "vmdk-create-type"
	RuleVMDKDescriptor       = "vmdk-descriptor"
	RuleVMDKDescriptorSyntax = "vmdk-descriptor-syntax"
	RuleVMDKExtent           = "vmdk-extent"
	RuleVMDKFooter           = "vmdk-footer"
	RuleVMDKHeader           = "vmdk-header"
	RuleVMDKSESparse         = "vmdk-sesparse"
	RuleVPCChecksum          = "vpc-checksum"
	RuleVPCHeader            = "vpc-header"
)

// Convert: qemu-img ran out of the memory or CPU time a job may use.
const RuleResourceLimit = "resource-limit"
