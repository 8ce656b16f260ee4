package events

// Object metadata keys (S3 user metadata, without the x-amz-meta- prefix)
// that convert sets on every output and that uploads may carry. Anyone
// reading the buckets relies on them, so they never change.
const (
	// MetaOutput marks an output, so that ingest never takes one in,
	// whatever the bucket layout.
	MetaOutput = "imagepipe-output"
	// MetaJob is the id of the job that wrote the object.
	MetaJob = "imagepipe-job"
	// MetaSource is the bucket/key of the input an output was made from.
	MetaSource = "imagepipe-source"
	// MetaSourceVersion and MetaSourceETag are the version and ETag of that
	// input, so that anyone can tell which version an output holds.
	MetaSourceVersion = "imagepipe-source-version"
	MetaSourceETag    = "imagepipe-source-etag"
	// MetaInputFormat is the format the input was detected as.
	MetaInputFormat = "imagepipe-input-format"
	// MetaVirtualSize is the disk's virtual size in bytes.
	MetaVirtualSize = "imagepipe-virtual-size"
	// MetaFormat, on an upload, asks for an output format (raw or qcow2).
	MetaFormat = "imagepipe-format"
	// MetaSHA256, on an upload, is the sha256 its bytes must have; outputs
	// written before TagSHA256 existed carry their own sha256 here.
	MetaSHA256 = "imagepipe-sha256"
	// MetaImportSource records where an imported object came from
	// (scheme, host and path, never credentials).
	MetaImportSource = "imagepipe-import-source"
)

// Object tags convert sets on every output. Tags, not metadata: metadata is
// fixed when an upload starts, and these are computed while it uploads.
const (
	// TagSHA256 is the output's sha256. It shares its name with
	// MetaSHA256 on purpose: both hold the sha256 of the object's bytes.
	TagSHA256 = "imagepipe-sha256"
	// TagCRC64NVME is an output's full-object CRC64NVME (base64), for
	// outputs the server keeps none for: those with parts copied from the
	// zero object.
	TagCRC64NVME = "imagepipe-crc64nvme"
)
