package ingest

import (
	"fmt"
	"path"
	"strings"
	"sync/atomic"

	"github.com/dustin/go-humanize"
	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/inspect"
)

// Reasons name every outcome of a notification record or a listed object.
// Stats counts them; the refusal reasons are also the Rule of the failure
// event.
const (
	ReasonQueued          = "queued"
	ReasonMalformed       = "malformed"             // the notification does not parse
	ReasonUnknownEvent    = "unknown-event"         // not an S3 event name at all
	ReasonNotAnUpload     = "not-an-upload"         // tagging, retention, deletes, ...
	ReasonOtherBucket     = "other-bucket"          // a bucket ingest does not watch
	ReasonFolderMarker    = "folder-marker"         // key ends in "/"
	ReasonEmpty           = "empty-object"          // zero bytes
	ReasonErrorReport     = "error-report"          // under events.ErrorPrefix
	ReasonOutputPrefix    = "output-prefix"         // under IMAGEPIPE_OUTPUT_PREFIX in a bucket that is also the output bucket
	ReasonExcludedPrefix  = "excluded-prefix"       // under IMAGEPIPE_INGEST_EXCLUDE_PREFIXES
	ReasonOutsidePrefixes = "outside-prefixes"      // under none of IMAGEPIPE_INGEST_PREFIXES
	ReasonExtension       = events.RuleExtension    // refused: not in IMAGEPIPE_INGEST_EXTENSIONS
	ReasonOutput          = events.MetaOutput       // carries events.MetaOutput; the reason is named after it
	ReasonGone            = "gone"                  // deleted before ingest could look at it
	ReasonTooLarge        = events.RuleMaxInputSize // refused: larger than IMAGEPIPE_MAX_INPUT_SIZE
	ReasonUnsafeKey       = events.RuleUnsafeKey    // refused: control characters, "..", too long
	ReasonReservedKey     = events.RuleReservedKey  // refused: a segment kept for outputs (events.OVADisksSegment)
)

var allReasons = []string{
	ReasonQueued, ReasonMalformed, ReasonUnknownEvent, ReasonNotAnUpload, ReasonOtherBucket,
	ReasonFolderMarker, ReasonEmpty, ReasonErrorReport, ReasonExcludedPrefix, ReasonOutsidePrefixes,
	ReasonExtension, ReasonOutput, ReasonGone, ReasonTooLarge, ReasonUnsafeKey,
	ReasonOutputPrefix, ReasonReservedKey,
}

// counters is a fixed map of reason to count: built once, then only its
// values change, so reads need no lock.
type counters map[string]*atomic.Uint64

func newCounters() counters {
	c := make(counters, len(allReasons))
	for _, r := range allReasons {
		c[r] = new(atomic.Uint64)
	}
	return c
}

func (c counters) add(reason string) {
	if n, ok := c[reason]; ok {
		n.Add(1)
	}
}

func (c counters) snapshot() map[string]uint64 {
	out := make(map[string]uint64, len(c))
	for r, n := range c {
		out[r] = n.Load()
	}
	return out
}

// createEvents start a job. PutTagging, PutRetention and the like are also
// s3:ObjectCreated:* but change no content: tagging an image must not
// convert it again. A large server-side copy arrives as
// CompleteMultipartUpload, which is here too.
var createEvents = map[string]bool{
	"s3:ObjectCreated:Put":                     true,
	"s3:ObjectCreated:Post":                    true,
	"s3:ObjectCreated:Copy":                    true,
	"s3:ObjectCreated:CompleteMultipartUpload": true,
}

func eventReason(name string) string {
	switch {
	case createEvents[name]:
		return ""
	case strings.HasPrefix(name, "s3:"):
		return ReasonNotAnUpload
	}
	return ReasonUnknownEvent
}

// candidate is an object that may deserve a job, from a notification, a
// listing or a stat.
type candidate struct {
	Bucket, Key     string
	Size            int64
	ETag, VersionID string
	// Metadata is the object's user metadata; nil when the source did not
	// say, which is not the same as none.
	Metadata map[string]string
}

// verdict is what the intake rules make of a candidate: a reason to skip
// it, a refusal to report, or neither (queue it).
type verdict struct {
	skip   string
	refuse *failure.Error
}

func (v verdict) reason() string {
	switch {
	case v.skip != "":
		return v.skip
	case v.refuse != nil:
		return v.refuse.Rule
	}
	return ReasonQueued
}

// keyVerdict applies the rules that depend on the key alone.
func (h *Handler) keyVerdict(key string) verdict {
	switch {
	case strings.HasSuffix(key, "/"):
		return verdict{skip: ReasonFolderMarker}
	case strings.HasPrefix(key, events.ErrorPrefix):
		return verdict{skip: ReasonErrorReport}
	case h.underOutputPrefix(key):
		return verdict{skip: ReasonOutputPrefix}
	case hasAnyPrefix(key, h.cfg.ExcludePrefixes):
		return verdict{skip: ReasonExcludedPrefix}
	case len(h.cfg.Prefixes) > 0 && !hasAnyPrefix(key, h.cfg.Prefixes):
		return verdict{skip: ReasonOutsidePrefixes}
	}
	if !h.allowedExtension(key) {
		// Whoever put it in the input bucket meant it to be converted:
		// they hear why it is not, rather than nothing at all.
		return verdict{refuse: failure.Refused(events.PhaseIntake, ReasonExtension,
			fmt.Errorf("%q does not name a disk image format imagepipe converts (accepted extensions: %s)", path.Base(key), strings.Join(h.cfg.Extensions, ", ")),
			"upload a VHDX, VHD, VMDK, QCOW2, VDI, raw (.img, .raw) or OVA file, named with its format's extension")}
	}
	if err := h.unsafeKeyUnderPrefix(key); err != nil {
		return verdict{refuse: failure.Refused(events.PhaseIntake, ReasonUnsafeKey, err,
			"rename the object to a key of printable characters without \"..\" segments and upload it again")}
	}
	if events.HasReservedSegment(key) {
		return verdict{refuse: reservedKey()}
	}
	return verdict{}
}

// reservedKey refuses a key that could be given an OVA disk's output key:
// the collision-free naming rule (events.OVADiskKey) holds only because no
// input has the segment OVA outputs are written under.
func reservedKey() *failure.Error {
	return failure.Refused(events.PhaseIntake, ReasonReservedKey,
		fmt.Errorf("the key has a %q folder, a name imagepipe keeps for the disks it converts out of OVA appliances", events.OVADisksSegment),
		"rename the folder and upload the image again")
}

// underOutputPrefix reports whether key is where convert writes outputs,
// which can only be an input's key when both buckets are one.
func (h *Handler) underOutputPrefix(key string) bool {
	return h.cfg.InputBucket == h.cfg.OutputBucket && h.cfg.OutputPrefix != "" && strings.HasPrefix(key, h.cfg.OutputPrefix)
}

// sizeVerdict applies the size rules.
func (h *Handler) sizeVerdict(size int64) verdict {
	switch {
	case size == 0:
		return verdict{skip: ReasonEmpty}
	case size > h.cfg.MaxInputSize:
		return verdict{refuse: h.tooLarge(size)}
	}
	return verdict{}
}

func (h *Handler) tooLarge(size int64) *failure.Error {
	return failure.Refused(events.PhaseIntake, ReasonTooLarge,
		fmt.Errorf("the object is %s (%d bytes), larger than the %s (%d bytes) limit set by IMAGEPIPE_MAX_INPUT_SIZE",
			humanize.IBytes(uint64(size)), size, humanize.IBytes(uint64(h.cfg.MaxInputSize)), h.cfg.MaxInputSize),
		"compress the image (.xz, .gz or .zst) or split the disk, or raise IMAGEPIPE_MAX_INPUT_SIZE on the ingest function if images this large are expected")
}

// judge applies every intake rule to a candidate. Skips come before
// refusals: an object nobody meant as an input is never reported as a
// failed one.
func (h *Handler) judge(c candidate) verdict {
	if c.Bucket != h.cfg.InputBucket {
		return verdict{skip: ReasonOtherBucket}
	}
	kv := h.keyVerdict(c.Key)
	if kv.skip != "" {
		return kv
	}
	sv := h.sizeVerdict(c.Size)
	if sv.skip != "" {
		return sv
	}
	if isOutput(c.Metadata) {
		return verdict{skip: ReasonOutput}
	}
	if kv.refuse != nil {
		return kv
	}
	return sv
}

func hasAnyPrefix(key string, prefixes []string) bool {
	for _, p := range prefixes {
		if strings.HasPrefix(key, p) {
			return true
		}
	}
	return false
}

// allowedExtension reports whether the key's last dot-separated word, after
// at most one compression suffix, is an allowed extension.
func (h *Handler) allowedExtension(key string) bool {
	if len(h.cfg.Extensions) == 1 && h.cfg.Extensions[0] == "*" {
		return true
	}
	name := strings.ToLower(path.Base(key))
	for _, s := range compressionSuffixes {
		if trimmed, ok := strings.CutSuffix(name, s); ok {
			name = trimmed
			break
		}
	}
	dot := strings.LastIndexByte(name, '.')
	if dot < 0 {
		return false
	}
	ext := name[dot+1:]
	for _, e := range h.cfg.Extensions {
		if ext == e {
			return true
		}
	}
	return false
}

// maxOutputSuffix is the longest suffix convert appends to a key.
const maxOutputSuffix = len(".qcow2")

// unsafeKeyUnderPrefix is unsafeKey with this handler's output prefix,
// which makes every output key longer.
func (h *Handler) unsafeKeyUnderPrefix(key string) error {
	if err := unsafeKey(key); err != nil {
		return err
	}
	if out := len(events.OutputKey(h.cfg.OutputPrefix, key, "qcow2")); out > events.MaxKeyLen {
		return fmt.Errorf("the key is %d bytes; its output key under IMAGEPIPE_OUTPUT_PREFIX %q would be %d bytes, over S3's %d-byte limit",
			len(key), h.cfg.OutputPrefix, out, events.MaxKeyLen)
	}
	return nil
}

// unsafeKey says why a key cannot be taken in, or nil. S3 stores any
// bytes, but the key travels on: into output keys, error report keys,
// logs, chat messages and, through tools such as mc mirror or s3fs, file
// names. A control character can forge a log line or a terminal escape; a
// ".." segment is resolved by every tool that maps keys onto a file system
// and would place the output outside its folder (MinIO refuses such keys on
// upload, so they only arrive from another S3 service or a forged
// notification); bidirectional overrides make a key read as another.
// Spaces, "+", other unicode and a leading "/" are fine: the job carries
// the key exactly.
func unsafeKey(key string) error {
	// The characters allowed are those allowed in an OVA member's name,
	// which becomes part of an output key too: one rule for both.
	if err := inspect.CheckName("key", key); err != nil {
		return err
	}
	if len(key)+maxOutputSuffix > events.MaxKeyLen {
		return fmt.Errorf("the key is %d bytes; its output key would exceed S3's %d-byte limit", len(key), events.MaxKeyLen)
	}
	// MinIO stores each segment as a file name, and refuses a key whose
	// last segment the output suffix would take past that limit.
	if name := path.Base(key); len(name)+maxOutputSuffix > events.MaxSegmentLen {
		return fmt.Errorf("the key's file name is %d bytes; its output's would exceed the %d-byte limit on one segment of a key", len(name), events.MaxSegmentLen)
	}
	return nil
}

// isOutput reports whether user metadata carries events.MetaOutput. S3 and
// MinIO spell metadata keys in several ways (X-Amz-Meta-Imagepipe-Output in
// notifications, imagepipe-output from a stat).
func isOutput(meta map[string]string) bool {
	for k := range meta {
		if strings.EqualFold(strings.TrimPrefix(strings.ToLower(k), "x-amz-meta-"), events.MetaOutput) {
			return true
		}
	}
	return false
}

// OutputLayout checks where outputs are written against where uploads
// arrive, and returns the output prefix in the form keys are compared with
// (ending in "/"). It runs at start-up, so that a layout in which a
// conversion could overwrite an upload, or ingest take an output in, never
// runs at all.
func OutputLayout(inputBucket, outputBucket, outputPrefix string) (string, error) {
	prefix := outputPrefix
	if prefix != "" && !strings.HasSuffix(prefix, "/") {
		prefix += "/"
	}
	if prefix != "" {
		if err := unsafeKey(prefix); err != nil {
			return "", fmt.Errorf("IMAGEPIPE_OUTPUT_PREFIX %q: %w; choose a prefix of printable characters such as converted/", outputPrefix, err)
		}
	}
	if strings.HasPrefix(prefix, events.ErrorPrefix) || prefix != "" && strings.HasPrefix(events.ErrorPrefix, prefix) {
		return "", fmt.Errorf("IMAGEPIPE_OUTPUT_PREFIX %q overlaps %s, where failure reports are written; choose another prefix, such as converted/", outputPrefix, events.ErrorPrefix)
	}
	if inputBucket == outputBucket && prefix == "" {
		return "", fmt.Errorf("IMAGEPIPE_INPUT_BUCKET and IMAGEPIPE_OUTPUT_BUCKET are both %q and IMAGEPIPE_OUTPUT_PREFIX is empty: "+
			"outputs would be written beside uploads, and converting a.vhdx would overwrite an upload named a.vhdx.raw; "+
			"set IMAGEPIPE_OUTPUT_PREFIX (for example converted/), which ingest then never reads, or set IMAGEPIPE_OUTPUT_BUCKET to another bucket", inputBucket)
	}
	return prefix, nil
}
