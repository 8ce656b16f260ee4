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
// it cannot yet (sha256 mode before the download) or must not.
func (h *Handler) contentKey(j *job) string {
	if h.dedup == nil || !bool(h.cfg.Dedup.Enabled) || j.NoDedup {
		return ""
	}
	if h.cfg.Dedup.Hash == dedup.HashSHA256 {
		if j.sha256In == "" {
			return ""
		}
		return dedup.ContentKeySHA256(j.sha256In)
	}
	if j.ETag == "" || j.Size <= 0 {
		return ""
	}
	return dedup.ContentKey(j.ETag, j.Size)
}

// reuse copies an earlier conversion of the same content to this job's
// output key, server-side, instead of converting again. It reports false
// when there is nothing to reuse, and then the job converts.
func (h *Handler) reuse(ctx context.Context, j *job) (bool, error) {
	ck := h.contentKey(j)
	if ck == "" {
		return false, nil
	}
	rec, found, err := h.dedup.Lookup(ctx, ck, j.outFormat)
	if err != nil {
		j.log.Warn("de-duplication lookup failed; converting", "err", err)
		return false, nil
	}
	if !found {
		return false, nil
	}
	if declared := declaredSHA256(j.upload); declared != "" && declared != rec.InputSHA256 {
		// The upload states what its bytes hash to; only a conversion of
		// bytes known to hash to that may stand in for checking it.
		return false, nil
	}
	outKey := h.outputKey(j)
	prev, err := h.store.Stat(ctx, rec.OutputBucket, rec.OutputKey)
	if err != nil || h.outputSHA256(ctx, prev) != rec.SHA256 {
		// The earlier output is gone or was replaced: convert, and the new
		// record replaces the stale one.
		if objstore.IsNotFound(err) || err == nil {
			_ = h.dedup.Forget(ctx, ck, j.outFormat)
		}
		return false, nil
	}
	d := &disk{format: inspect.Format(rec.InputFormat), virtualSize: rec.VirtualSize, outKey: outKey, outSize: rec.Size, sha256: rec.SHA256}
	j.format, j.inputSize, j.disks = d.format, j.Size, []*disk{d}
	if rec.OutputBucket == h.cfg.OutputBucket && rec.OutputKey == outKey {
		return true, nil // the same content at the same key: already in place
	}
	j.duplicateOf = rec.Output()
	j.log.Info("same content already converted; copying its output", "stage", events.PhaseUpload, "duplicate_of", j.duplicateOf, "output_key", outKey)
	if _, err := h.store.Copy(ctx, rec.OutputBucket, rec.OutputKey, "", prev.ETag, h.cfg.OutputBucket, outKey, outputMeta(j, d), outputTags(d), h.guard(j, outKey)); err != nil {
		if errors.Is(err, errSuperseded) || errors.Is(err, objstore.ErrContended) {
			return true, classifyOutput(err)
		}
		if objstore.IsChanged(err) || objstore.IsNotFound(err) {
			j.duplicateOf, j.disks = "", nil
			return false, nil
		}
		return true, failure.Retryable(events.PhaseUpload, err, "")
	}
	return true, nil
}

// remember records a finished single-disk conversion for later uploads of
// the same content. Losing a record only costs a conversion.
func (h *Handler) remember(ctx context.Context, j *job) {
	ck := h.contentKey(j)
	if ck == "" || len(j.disks) != 1 || j.duplicateOf != "" || j.format == inspect.OVA {
		return
	}
	d := j.disks[0]
	err := h.dedup.Put(ctx, ck, j.outFormat, dedup.Record{
		OutputBucket: h.cfg.OutputBucket, OutputKey: d.outKey, SHA256: d.sha256, Size: d.outSize, JobID: j.JobID,
		InputBucket: j.Bucket, InputKey: j.Key, InputFormat: string(d.format), VirtualSize: d.virtualSize,
		InputSHA256: j.sha256In,
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
	if v := strings.ToLower(strings.TrimSpace(obj.Metadata[MetaSHA256])); v != "" {
		return v
	}
	if obj.Checksum != "" && !strings.Contains(obj.Checksum, "-") {
		if raw, err := base64.StdEncoding.DecodeString(obj.Checksum); err == nil {
			return hex.EncodeToString(raw)
		}
	}
	return ""
}
