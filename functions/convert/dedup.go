package convert

import (
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"strings"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/dedup"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/inspect"
	"github.com/imagepipe/imagepipe/internal/objstore"
)

// Deduper remembers which content was converted to which output.
type Deduper interface {
	Lookup(ctx context.Context, contentKey, format string) (dedup.Record, bool, error)
	Put(ctx context.Context, contentKey, format string, r dedup.Record) error
	Forget(ctx context.Context, contentKey, format string) error
}

// contentKey identifies the job's content for de-duplication, or "" when
// it cannot yet (sha256 mode before the download: sha256In is "") or
// must not.
func (h *Handler) contentKey(j *job, sha256In string) string {
	if j.dedup == nil || !bool(h.cfg.Dedup.Enabled) || j.NoDedup {
		return ""
	}
	if h.cfg.Dedup.Hash == dedup.HashSHA256 {
		if sha256In == "" {
			return ""
		}
		return dedup.ContentKeySHA256(sha256In)
	}
	if j.ETag == "" || j.Size <= 0 {
		return ""
	}
	return dedup.ContentKey(j.ETag, j.Size)
}

// earlierOutput is a complete output of the same content, made by an
// earlier job.
type earlierOutput struct {
	contentKey string
	rec        dedup.Record
	etag       string // of the output as looked at
}

// findEarlier looks for an earlier conversion of the content ck names
// whose output is still in place and complete. p's look at this job's
// own output serves when the record points there.
func (h *Handler) findEarlier(ctx context.Context, j *job, p plan, ck string) (earlierOutput, bool) {
	if ck == "" {
		return earlierOutput{}, false
	}
	rec, found, err := j.dedup.Lookup(ctx, ck, p.outFormat)
	if err != nil {
		j.log.Warn("de-duplication lookup failed; converting", "err", err)
		return earlierOutput{}, false
	}
	if !found {
		return earlierOutput{}, false
	}
	if declared := declaredSHA256(p.upload); declared != "" && declared != rec.InputSHA256 {
		// The upload states what its bytes hash to; only a conversion of
		// bytes known to hash to that may stand in for checking it.
		return earlierOutput{}, false
	}
	var prev objstore.Object
	if rec.OutputBucket == h.cfg.OutputBucket && rec.OutputKey == p.outKey {
		err = p.outputErr
		if p.output != nil {
			prev = *p.output
		}
	} else {
		prev, err = j.store.Stat(ctx, rec.OutputBucket, rec.OutputKey)
	}
	if err != nil || outputSHA256(ctx, j.store, prev) != rec.SHA256 {
		// The earlier output is gone or was replaced: convert, and the new
		// record replaces the stale one.
		if objstore.IsNotFound(err) || err == nil {
			_ = j.dedup.Forget(ctx, ck, p.outFormat)
		}
		return earlierOutput{}, false
	}
	return earlierOutput{contentKey: ck, rec: rec, etag: prev.ETag}, true
}

// errStale means an earlier output vanished or changed while it was being
// copied: the job converts after all.
var errStale = errors.New("the earlier output changed while it was copied")

// copyEarlier copies an earlier conversion of the same content to this
// job's output key, server-side, instead of converting again.
func (h *Handler) copyEarlier(ctx context.Context, j *job, outKey string, e earlierOutput) (outcome, error) {
	rec := e.rec
	d := disk{format: inspect.Format(rec.InputFormat), virtualSize: rec.VirtualSize, outKey: outKey, outSize: rec.Size, sha256: rec.SHA256}
	res := outcome{format: d.format, inputSize: j.Size, disks: []disk{d}}
	if rec.OutputBucket == h.cfg.OutputBucket && rec.OutputKey == outKey {
		return res, nil // the same content at the same key: already in place
	}
	res.duplicateOf = rec.Output()
	j.log.Info("same content already converted; copying its output", "stage", events.PhaseUpload, "duplicate_of", res.duplicateOf, "output_key", outKey)
	// Write order: one write, the copy carrying its metadata and tag, so
	// the output is complete the moment it appears; DUPLICATE is recorded
	// after it (succeed), as READY is after a conversion's tag.
	if _, err := j.store.Copy(ctx, rec.OutputBucket, rec.OutputKey, "", e.etag, h.cfg.OutputBucket, outKey, outputMeta(j, d), outputTags(d), h.guard(j, outKey)); err != nil {
		if errors.Is(err, errSuperseded) || errors.Is(err, objstore.ErrContended) {
			return res, classifyOutput(err)
		}
		if objstore.IsChanged(err) || objstore.IsNotFound(err) {
			return outcome{}, errStale
		}
		return res, failure.Retryable(events.PhaseUpload, err, "")
	}
	return res, nil
}

// remember records a finished single-disk conversion for later uploads of
// the same content. Losing a record only costs a conversion.
//
// Write order: after the output's tag and its READY (see succeed). A
// record is read as a promise that its output is complete; written first,
// a crash would leave one pointing at an output that is not, and another
// upload would copy it.
func (h *Handler) remember(ctx context.Context, j *job, res outcome) {
	ck := h.contentKey(j, res.sha256In)
	if ck == "" || len(res.disks) != 1 || res.duplicateOf != "" || res.format == inspect.OVA {
		return
	}
	d := res.disks[0]
	err := j.dedup.Put(ctx, ck, j.outFormat, dedup.Record{
		OutputBucket: h.cfg.OutputBucket, OutputKey: d.outKey, SHA256: d.sha256, Size: d.outSize, JobID: j.JobID,
		InputBucket: j.Bucket, InputKey: j.Key, InputFormat: string(d.format), VirtualSize: d.virtualSize,
		InputSHA256: res.sha256In,
	})
	if err != nil && !errors.Is(err, context.Canceled) {
		j.log.Warn("de-duplication record not written", "err", err)
	}
}

// declaredSHA256 is the hex SHA-256 the uploader declared for its bytes, if
// any: x-amz-meta-imagepipe-sha256, or S3's x-amz-checksum-sha256 of a
// single-part upload.
func declaredSHA256(obj *objstore.Object) string {
	if obj == nil {
		return ""
	}
	if v := strings.ToLower(strings.TrimSpace(obj.Metadata[events.MetaSHA256])); v != "" {
		return v
	}
	if obj.Checksum != "" && !strings.Contains(obj.Checksum, "-") {
		if raw, err := base64.StdEncoding.DecodeString(obj.Checksum); err == nil {
			return hex.EncodeToString(raw)
		}
	}
	return ""
}
