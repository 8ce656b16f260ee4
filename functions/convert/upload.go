package convert

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/scratch"
)

// stored is an output the store holds, not yet marked complete.
type stored struct {
	obj    objstore.Object
	sha256 string
}

// fileOutput is the destination of an output uploaded once it is complete
// and verified: qemu-img writes the scratch file, and the file is then
// uploaded and hashed at once.
type fileOutput struct {
	h  *Handler
	j  *job
	tr tracker
	d  disk
}

func (f fileOutput) write(ctx context.Context, onProgress func(float64)) error {
	return f.h.qemu.Convert(ctx, f.d.input, string(f.d.format), f.d.output, f.j.outFormat, onProgress)
}

func (fileOutput) streaming() bool                           { return false }
func (fileOutput) failed(_ context.Context, err error) error { return err }
func (fileOutput) abandon(error)                             {}
func (fileOutput) close()                                    {}

func (f fileOutput) store(ctx context.Context, d disk) (stored, error) {
	return f.h.uploadFile(ctx, f.j, f.tr, d, f.h.guard(f.j, d.outKey))
}

// uploadFile sends the output and hashes it at the same time: on a large
// image both take seconds, and neither needs the other until the end.
// guard runs just before the output is completed; an OVA's disks wait
// there for one another.
func (h *Handler) uploadFile(ctx context.Context, j *job, tr tracker, d disk, guard objstore.Guard) (stored, error) {
	tr.set(ctx, events.StateUploading, 0)
	j.log.Info("uploading", "stage", events.PhaseUpload, "output_bucket", h.cfg.OutputBucket, "output_key", d.outKey, "size", d.outSize)
	// One open file serves both: its holes are mapped once, and the
	// hash and the parts share its read windows.
	f, err := scratch.Open(d.output)
	if err != nil {
		return stored{}, failure.Retryable(events.PhaseUpload, fmt.Errorf("open the output: %w", err), "")
	}
	defer f.Close()
	hctx, stopHash := context.WithCancel(ctx)
	defer stopHash()
	type hashed struct {
		sum string
		err error
	}
	sumc := make(chan hashed, 1)
	go func() {
		sum, err := sectionSHA256(hctx, f.Section(0, f.Size()))
		sumc <- hashed{sum, err}
	}()

	// Uploading to the same key on a redelivery replaces the object whole:
	// S3 never exposes a half-written one, so a retry cannot corrupt it.
	zeros, closeZeros := h.zeroParts(j, d)
	defer closeZeros()
	guard.Zeros = zeros
	meter := tr.meter(ctx, events.PhaseUpload, events.StateUploading, d.outSize)
	obj, err := j.store.Upload(ctx, h.cfg.OutputBucket, d.outKey, f, outputMeta(j, d), meter, guard)
	if err != nil {
		stopHash()
		<-sumc
		return stored{}, classifyOutput(err)
	}
	hs := <-sumc
	if hs.err != nil {
		return stored{}, failure.Retryable(events.PhaseUpload, hs.err, "")
	}
	return stored{obj: obj, sha256: hs.sum}, nil
}

// complete marks a stored output complete: the hash is tagged on the
// object last, so an output without it is one whose upload may not have
// finished; the scratch copies are no longer needed, and an OVA's next
// disk may need the room. The tag goes only on this job's own output,
// and only while its input is still the version converted: a newer
// version's job may have written the key since.
//
// Write order, output then tag: the tag is the one mark of a complete
// output that alreadyDone, reconcile's restore of a lost READY and
// de-duplication trust. A crash between the two leaves an untagged output,
// which each of them treats as absent, so the job converts again and
// replaces it whole.
func (h *Handler) complete(ctx context.Context, j *job, d disk, st stored) (disk, error) {
	d.sha256, d.crc64nvme, d.zeroBytes = st.sha256, st.obj.CRC64NVME, st.obj.ZeroBytes
	if err := h.stillOurs(ctx, j, st.obj); err != nil {
		return d, err
	}
	if err := j.store.SetTags(ctx, h.cfg.OutputBucket, d.outKey, st.obj.VersionID, outputTags(d)); err != nil {
		return d, classifyWrite(err)
	}
	_ = os.Remove(d.output)
	if d.member != "" {
		_ = os.Remove(d.input) // an OVA's extracted disk; the download stays
	}
	return d, nil
}

// zeroParts lets the upload of a raw output copy the parts that are holes
// of its scratch file from the output bucket's zero object instead of
// sending them. Where the holes cannot be asked about, every part is sent.
func (h *Handler) zeroParts(j *job, d disk) (*objstore.Zeros, func()) {
	if j.outFormat != "raw" {
		return nil, func() {}
	}
	holes, err := scratch.OpenHoles(d.output)
	if err != nil {
		j.log.Warn("holes of the output unknown; sending its zeros", "stage", events.PhaseUpload, "err", err)
		return nil, func() {}
	}
	return &objstore.Zeros{Holes: holes, Key: events.ZeroObjectKey(h.cfg.OutputPrefix)}, func() { holes.Close() }
}

func sectionSHA256(ctx context.Context, r *scratch.Section) (string, error) {
	hsh := sha256.New()
	if _, err := io.Copy(ctxWriter{ctx, hsh}, r); err != nil {
		return "", fmt.Errorf("hash the output: %w", err)
	}
	return hex.EncodeToString(hsh.Sum(nil)), nil
}

// ctxWriter stops a copy once its context is done.
type ctxWriter struct {
	ctx context.Context
	w   io.Writer
}

func (c ctxWriter) Write(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.w.Write(p)
}
