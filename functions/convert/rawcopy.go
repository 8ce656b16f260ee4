package convert

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strconv"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/inspect"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/minio/minio-go/v7"
)

// copyRaw copies a raw upload whose target is raw server-side instead of
// downloading it to scratch (the plan inspected its header through ranged
// reads): the bytes are hashed as they stream past, and the object is
// copied on the ETag just hashed.
func (h *Handler) copyRaw(ctx context.Context, j *job, p plan) (outcome, error) {
	up := *p.upload
	res := outcome{format: inspect.Raw, inputSize: up.Size}
	if err := inspect.CheckExtension(p.header, j.Key); err != nil {
		return outcome{}, classifyInspect(err)
	}
	d := disk{format: inspect.Raw, virtualSize: up.Size, outKey: p.outKey, outSize: up.Size}
	tr := h.track(j, inspect.Raw)
	tr.set(ctx, events.StateUploading, 0)
	j.log.Info("raw upload: copying server-side", "stage", events.PhaseUpload, "output_key", d.outKey, "size", up.Size)

	sum, err := h.hashUpload(ctx, j, tr, up)
	if err != nil {
		return res, err
	}
	d.sha256, d.crc64nvme = sum.sha256, sum.crc64nvme
	res.sha256In, res.disks = d.sha256, []disk{d}
	if err := verifyChecksum(up, d.sha256); err != nil {
		return res, err
	}
	// Copying on the ETag just hashed: if the object changed in between,
	// the copy fails instead of publishing a hash of other bytes. The copy
	// carries its tags, so it is complete the moment it appears, and like
	// every output write it completes only while the input is still the
	// job's version.
	if _, err := j.store.Copy(ctx, j.Bucket, j.Key, j.VersionID, up.ETag, h.cfg.OutputBucket, d.outKey, outputMeta(j, d), outputTags(d), h.guard(j, d.outKey)); err != nil {
		if objstore.IsChanged(err) && !errors.Is(err, objstore.ErrContended) {
			return res, errSuperseded
		}
		return res, classifyOutput(fmt.Errorf("server-side copy: %w", err))
	}
	return res, nil
}

// sums are the checksums of an object's bytes.
type sums struct {
	sha256    string
	crc64nvme string // base64, as S3 writes it
}

// hashUpload reads the upload as looked at, once, for its checksums.
func (h *Handler) hashUpload(ctx context.Context, j *job, tr tracker, up objstore.Object) (sums, error) {
	rc, _, err := j.store.Open(ctx, j.Bucket, j.Key, j.VersionID, up.ETag)
	if err != nil {
		return sums{}, classifyDownload(j, err)
	}
	defer rc.Close()
	sum, crc := sha256.New(), minio.ChecksumCRC64NVME.Hasher()
	meter := tr.meter(ctx, events.PhaseVerify, events.StateUploading, up.Size)
	if _, err := io.Copy(io.MultiWriter(sum, crc, meter), rc); err != nil {
		return sums{}, classifyDownload(j, err)
	}
	return sums{sha256: hex.EncodeToString(sum.Sum(nil)), crc64nvme: base64.StdEncoding.EncodeToString(crc.Sum(nil))}, nil
}

// outputMeta is the metadata every output carries, with the version and
// ETag of the upload it was made from where the job knows them.
func outputMeta(j *job, d disk) map[string]string {
	meta := map[string]string{
		events.MetaOutput:      "true",
		events.MetaJob:         j.JobID,
		events.MetaSource:      j.Bucket + "/" + j.Key,
		events.MetaInputFormat: string(d.format),
		events.MetaVirtualSize: strconv.FormatInt(d.virtualSize, 10),
	}
	if j.VersionID != "" {
		meta[events.MetaSourceVersion] = j.VersionID
	}
	if j.ETag != "" {
		meta[events.MetaSourceETag] = j.ETag
	}
	return meta
}

// outputTags are the tags every output carries once it is complete.
func outputTags(d disk) map[string]string {
	tags := map[string]string{events.TagSHA256: d.sha256}
	if d.crc64nvme != "" {
		tags[events.TagCRC64NVME] = d.crc64nvme
	}
	return tags
}
