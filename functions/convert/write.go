package convert

import (
	"context"
	"errors"
	"fmt"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/scratch"
)

// Every write of an output, whatever made it (an upload, a stream, a
// server-side copy), completes only while the job's input is still the
// version it was queued for, and is marked complete only while the output
// key still holds it: a newer version's job owns the key from the moment
// its input replaced this one's.

// guard is what every write of the job's outputs checks just before it
// completes: that the input is still the version the job converted.
//
// The upload's id is noted in the job's scratch dir, for the sweep that
// follows a process's death.
func (h *Handler) guard(j *job, key string) objstore.Guard {
	g := objstore.Guard{Check: func(ctx context.Context) error { return h.stillCurrent(ctx, j) }}
	// The guard is made just before the write: noted now, the upload the
	// write is about to start can be found even if the process dies before
	// its id is known.
	if err := scratch.NoteUpload(j.dir, scratch.NotedUpload{Bucket: h.cfg.OutputBucket, Key: key, Since: h.now()}); err != nil {
		j.log.Warn("upload not noted in scratch; if this process dies, the server's expiry of stale uploads removes it", "output_key", key, "err", err)
	}
	g.Started = func(uploadID string) {
		if err := scratch.NoteUpload(j.dir, scratch.NotedUpload{Bucket: h.cfg.OutputBucket, Key: key, UploadID: uploadID}); err != nil {
			j.log.Warn("upload not noted in scratch; if this process dies, the server's expiry of stale uploads removes it", "output_key", key, "err", err)
		}
	}
	return g
}

// stillCurrent returns errSuperseded when the input is no longer the
// version and content the job was queued for: it was overwritten or
// deleted, and its newer version, if any, has a job of its own whose
// output must not be replaced by this one's.
func (h *Handler) stillCurrent(ctx context.Context, j *job) error {
	if j.VersionID == "" && j.ETag == "" {
		return nil
	}
	cur, err := j.store.Stat(ctx, j.Bucket, j.Key)
	switch {
	case objstore.IsNotFound(err):
		return errSuperseded
	case err != nil:
		return fmt.Errorf("check the upload is still the version converted: %w", err)
	case superseded(j, cur):
		return errSuperseded
	}
	return nil
}

// stillOurs checks, before the job marks obj complete, that obj is still
// what the output key holds and the input is still the job's version.
func (h *Handler) stillOurs(ctx context.Context, j *job, obj objstore.Object) error {
	if err := h.stillCurrent(ctx, j); err != nil {
		return classifyOutput(err)
	}
	cur, err := j.store.Stat(ctx, obj.Bucket, obj.Key)
	if objstore.IsNotFound(err) {
		return errSuperseded
	}
	if err != nil {
		return classifyWrite(err)
	}
	if cur.Metadata[events.MetaJob] != j.JobID || cur.ETag != obj.ETag {
		return errSuperseded
	}
	return nil
}

// handBack runs when a job ends superseded. Its own state updates may
// have replaced the record of the newer version's job, which `imagepipe
// status` and `upload` follow; when that job's output is already complete
// (made from the input as it is now, and tagged), its READY is written
// back. A newer job still running writes its own states soon enough.
func (h *Handler) handBack(ctx context.Context, j *job) {
	if st, err := j.report.Get(ctx, j.Bucket, j.Key); err != nil || st.JobID != j.JobID {
		return
	}
	in, err := j.store.Stat(ctx, j.Bucket, j.Key)
	if err != nil {
		return
	}
	key := events.OutputKey(h.cfg.OutputPrefix, j.Key, j.outFormat)
	out, err := j.store.Stat(ctx, h.cfg.OutputBucket, key)
	if err != nil || out.Metadata[events.MetaJob] == "" || out.Metadata[events.MetaSourceETag] != in.ETag ||
		out.Metadata[events.MetaSourceVersion] != in.VersionID || outputSHA256(ctx, j.store, out) == "" {
		return
	}
	st := events.Status{
		Bucket: j.Bucket, Key: j.Key, JobID: out.Metadata[events.MetaJob], State: events.StateReady, Percent: 100,
		InputFormat: out.Metadata[events.MetaInputFormat], OutputBucket: h.cfg.OutputBucket, OutputKey: key, UpdatedAt: h.now().UTC(),
	}
	if err := j.report.Set(ctx, st); err != nil {
		j.log.Warn("status of the newer version not restored", "err", err)
	}
}

// classifyOutput decides on a failed write of an output: vetoed because
// the input changed is the quiet end of a superseded job; losing to other
// writers every time may pass later; anything else as classifyWrite.
func classifyOutput(err error) error {
	switch {
	case errors.Is(err, errSuperseded):
		return errSuperseded
	case errors.Is(err, objstore.ErrContended):
		return failure.Retryable(events.PhaseUpload, err, "")
	}
	return classifyWrite(err)
}
