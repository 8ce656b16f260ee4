package events

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"unicode/utf8"
)

// Where outputs and error reports are written. Users find them through the
// result event, never by guessing; these rules exist so that no two inputs
// can ever be given the same output key.
//
// A plain upload K converts to K + "." + format, under the output prefix:
//
//	disks/win11.vhdx              → disks/win11.vhdx.raw
//
// Disk member M of an OVA at K converts to K/.ova-disks/M + "." + format:
//
//	apps/web.ova (web-disk1.vmdk) → apps/web.ova/.ova-disks/web-disk1.vmdk.raw
//
// Why no upload can collide with another: an OVA output's second-to-last
// path segment is OVADisksSegment and its last is the member's name, which
// never holds a "/". A plain output K + ".raw" has that shape only if K has
// OVADisksSegment as a segment, and ingest refuses such keys
// (HasReservedSegment). Two OVA outputs are equal only if their OVA keys
// and member names are, and an OVA's member names are unique (the archive
// reader refuses duplicates).
const OVADisksSegment = ".ova-disks"

// ReservedSegment is the folder, right under the output prefix in the
// output bucket, where imagepipe keeps objects of its own that are not
// outputs. It is under the output prefix (which ingest skips when both
// buckets are one), and no input may have it as a segment
// (HasReservedSegment): no output key falls in it.
const ReservedSegment = ".imagepipe"

// ZeroObjectKey is where the output bucket keeps its zero object, the
// source raw outputs' runs of zeros are copied from server-side. prefix
// is the configured output prefix. It ends in .raw so that a server that
// compresses raw outputs compresses it too, to almost nothing.
func ZeroObjectKey(prefix string) string {
	return prefix + ReservedSegment + "/zeros.raw"
}

// ErrorPrefix holds the failure reports of inputs, in the input bucket;
// ingest never takes anything under it in.
const ErrorPrefix = "errors/"

// MaxKeyLen is S3's limit on an object key, in bytes.
const MaxKeyLen = 1024

// MaxSegmentLen is MinIO's limit on one "/"-separated segment of a key, in
// bytes: on a file system each segment is a file or directory name.
const MaxSegmentLen = 255

// OutputKey is where the output of a plain upload is written in the output
// bucket. prefix is the configured output prefix ("" by default).
func OutputKey(prefix, inputKey, format string) string {
	return prefix + inputKey + "." + format
}

// OVADiskKey is where the output of disk member of the OVA at ovaKey is
// written. member must already have passed the archive reader's name
// rules (no "/", no control characters).
func OVADiskKey(prefix, ovaKey, member, format string) string {
	return prefix + ovaKey + "/" + OVADisksSegment + "/" + member + "." + format
}

// HasReservedSegment reports whether key has a path segment reserved for
// outputs (OVADisksSegment) or for imagepipe's own objects
// (ReservedSegment), which no input may have.
func HasReservedSegment(key string) bool {
	for _, seg := range strings.Split(key, "/") {
		if seg == OVADisksSegment || seg == ReservedSegment {
			return true
		}
	}
	return false
}

// errorReportSuffix ends every error report key.
const errorReportSuffix = ".error.json"

// ErrorReportKey is where the report of a failed input is written, in the
// input bucket, so an operator finds it with any S3 browser. A key too long
// to fit S3's limit with the prefix and suffix around it, or whose last
// segment would grow past MinIO's segment limit, is cut at a character
// boundary and ends in a hash of the whole key, so two long keys never
// share a report; shortened says so, and the report itself holds the whole
// key.
func ErrorReportKey(inputKey string) (key string, shortened bool) {
	key = ErrorPrefix + inputKey + errorReportSuffix
	if len(key) <= MaxKeyLen && len(lastSegment(key)) <= MaxSegmentLen {
		return key, false
	}
	sum := sha256.Sum256([]byte(inputKey))
	tag := "~" + hex.EncodeToString(sum[:8])
	keep := min(len(inputKey), MaxKeyLen-len(ErrorPrefix)-len(tag)-len(errorReportSuffix))
	if over := len(lastSegment(inputKey[:keep])) + len(tag) + len(errorReportSuffix) - MaxSegmentLen; over > 0 {
		keep -= over
	}
	// Back up to the start of the character the cut would split.
	for keep > 0 && keep < len(inputKey) && !utf8.RuneStart(inputKey[keep]) {
		keep--
	}
	return ErrorPrefix + inputKey[:keep] + tag + errorReportSuffix, true
}

func lastSegment(key string) string { return key[strings.LastIndexByte(key, '/')+1:] }
