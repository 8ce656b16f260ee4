package convert

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strconv"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/inspect"
	"github.com/imagepipe/imagepipe/internal/objstore"
)

// copyRaw handles a raw upload whose target is raw without downloading it
// to scratch: the header is inspected through ranged reads, the bytes are
// hashed as they stream past, and the object is copied server-side. It
// reports false when the upload is anything else, for the full path.
func (h *Handler) copyRaw(ctx context.Context, j *job) (bool, error) {
	if j.outFormat != "raw" {
		return false, nil
	}
	obj, err := h.store.Stat(ctx, j.Bucket, j.Key)
	if err != nil || (j.ETag != "" && obj.ETag != j.ETag) || obj.Size == 0 {
		return false, nil // the download path reports what is wrong
	}
	if f := obj.Metadata[MetaFormat]; f != "" && f != "raw" {
		return false, nil
	}
	ra, err := h.store.ReaderAt(ctx, j.Bucket, j.Key, j.VersionID)
	if err != nil {
		return false, nil
	}
	defer ra.Close()
	head := make([]byte, 8)
	if _, err := ra.ReadAt(head, 0); err != nil && err != io.EOF {
		return false, nil
	}
	if isCompressed(head) {
		return false, nil
	}
	rep, err := inspect.Inspect(ra, obj.Size, h.limits())
	if err != nil || rep.Format != inspect.Raw {
		return false, nil
	}
	if err := inspect.CheckExtension(rep, j.Key); err != nil {
		return true, classifyInspect(err)
	}

	j.format, j.inputSize, j.meta = inspect.Raw, obj.Size, obj.Metadata
	d := &disk{format: inspect.Raw, virtualSize: obj.Size, outKey: events.OutputKey(h.cfg.OutputPrefix, j.Key, j.outFormat), outSize: obj.Size}
	j.disks = []*disk{d}
	h.setState(ctx, j, events.StateUploading, 0)
	j.log.Info("raw upload: copying server-side", "stage", events.PhaseUpload, "output_key", d.outKey, "size", obj.Size)

	rc, _, err := h.store.Open(ctx, j.Bucket, j.Key, j.VersionID, obj.ETag)
	if err != nil {
		return true, classifyDownload(j, err)
	}
	sum := sha256.New()
	meter := h.newMeter(ctx, j, events.PhaseVerify, events.StateUploading, obj.Size)
	_, err = io.Copy(io.MultiWriter(sum, meter), rc)
	rc.Close()
	if err != nil {
		return true, classifyDownload(j, err)
	}
	d.sha256 = hex.EncodeToString(sum.Sum(nil))
	j.sha256In = d.sha256
	if err := verifyChecksum(obj, d.sha256); err != nil {
		return true, err
	}
	// Copying on the ETag just hashed: if the object changed in between,
	// the copy fails instead of publishing a hash of other bytes. The copy
	// carries its tags, so it is complete the moment it appears, and like
	// every output write it completes only while the input is still the
	// job's version.
	if _, err := h.store.Copy(ctx, j.Bucket, j.Key, j.VersionID, obj.ETag, h.cfg.OutputBucket, d.outKey, outputMeta(j, d), outputTags(d), h.guard(j, d.outKey)); err != nil {
		if objstore.IsChanged(err) && !errors.Is(err, objstore.ErrContended) {
			return true, errSuperseded
		}
		return true, classifyOutput(fmt.Errorf("server-side copy: %w", err))
	}
	return true, nil
}

// outputMeta is the metadata every output carries, with the version and
// ETag of the upload it was made from where the job knows them.
func outputMeta(j *job, d *disk) map[string]string {
	meta := map[string]string{
		MetaOutput: "true",
		MetaJob:    j.JobID,
		MetaSource: j.Bucket + "/" + j.Key,
		MetaInput:  string(d.format),
		MetaVSize:  strconv.FormatInt(d.virtualSize, 10),
	}
	if j.VersionID != "" {
		meta[MetaSourceVersion] = j.VersionID
	}
	if j.ETag != "" {
		meta[MetaSourceETag] = j.ETag
	}
	return meta
}

// outputTags are the tags every output carries once it is complete.
func outputTags(d *disk) map[string]string {
	return map[string]string{TagSHA256: d.sha256}
}
