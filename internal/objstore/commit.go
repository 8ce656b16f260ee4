package objstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/minio/minio-go/v7"
)

// Every write of an output is a multipart upload of its own, in two
// phases: the parts go up, and only then is the upload completed, which is
// the one moment the object changes. Two writers of one key (two versions
// of one input in flight, a redelivered job) meet at that moment, so that
// is where a write is decided:
//
//  1. the destination's current state is read (its ETag, or that it is
//     absent);
//  2. the caller's Guard says whether it may still write (its input is
//     still the version it converted);
//  3. the upload completes only if the destination is still in the state
//     read in 1 (If-Match: <etag> or If-None-Match: *).
//
// A writer that passed its guard therefore never replaces an object that
// another writer completed after the guard ran: its completion fails, and
// it looks again from 1, where its guard decides with the other write in
// view. A write that fails or is vetoed aborts its own upload id and no
// other: a second writer of the same key keeps its parts. Uploads whose
// writer died are left to the server: MinIO removes them after
// MINIO_API_STALE_UPLOADS_EXPIRY (24h by default); other S3 services need
// an AbortIncompleteMultipartUpload lifecycle rule on the output bucket.

// Guard is what a caller asks of one write of an output besides its
// bytes. The zero Guard asks nothing.
type Guard struct {
	// Check runs just before the write completes. An error vetoes the
	// write, which then leaves the destination as it was; the error is
	// returned, wrapped, by the write.
	Check func(ctx context.Context) error
	// Started, if set, is told the upload id as soon as the upload
	// exists. A writer that dies mid-write leaves the upload behind, and
	// whoever cleans up after it can then abort that upload, and no other
	// writer's (Store.Abort).
	Started func(uploadID string)
	// Zeros, if set, has the parts of the source that are holes copied
	// server-side from the bucket's zero object instead of sent (see
	// zero.go).
	Zeros *Zeros
}

// started tells g.Started, if set, of a new upload.
func (g Guard) started(uploadID string) {
	if g.Started != nil {
		g.Started(uploadID)
	}
}

// ErrContended means other writers completed the same key each time this
// write was about to: it gave up without writing. Trying again later can
// succeed.
var ErrContended = errors.New("other writers kept completing the object while this write was about to")

// commitAttempts bounds the rounds of reading, guarding and completing a
// write whose destination other writers keep changing.
const commitAttempts = 3

// abortTimeout bounds the abort of a failed upload, which runs on after
// the caller's context is done.
const abortTimeout = 30 * time.Second

// commit completes uploadID as described above. Without a guard the
// upload completes unconditionally, replacing whatever is there.
func (s *Store) commit(ctx context.Context, core minio.Core, bucket, key, uploadID string, parts []minio.CompletePart, opts minio.PutObjectOptions, guard Guard) (minio.UploadInfo, error) {
	if guard.Check == nil {
		return core.CompleteMultipartUpload(ctx, bucket, key, uploadID, parts, opts)
	}
	var err error
	for range commitAttempts {
		// A fresh copy each round: the condition of the last round must
		// not linger in the headers.
		cond := opts
		cur, serr := s.client.StatObject(ctx, bucket, key, minio.StatObjectOptions{})
		switch {
		case serr == nil:
			cond.SetMatchETag(cur.ETag)
		case IsNotFound(serr):
			cond.SetMatchETagExcept("*")
		default:
			return minio.UploadInfo{}, fmt.Errorf("read what %s/%s holds now: %w", bucket, key, serr)
		}
		if gerr := guard.Check(ctx); gerr != nil {
			return minio.UploadInfo{}, gerr
		}
		var info minio.UploadInfo
		info, err = core.CompleteMultipartUpload(ctx, bucket, key, uploadID, parts, cond)
		if err == nil || !IsChanged(err) {
			return info, err
		}
	}
	return minio.UploadInfo{}, fmt.Errorf("%w: %w", ErrContended, err)
}

// abort removes the parts of this writer's own failed upload, and of no
// other upload of the key. minio-go aborts with the caller's context,
// which a cancelled job no longer has: this uses one that still works.
// The write often failed because the server went away, so the abort is
// tried again until the server answers or abortTimeout passes; the
// server's expiry of stale uploads covers a server gone for longer.
func (s *Store) abort(ctx context.Context, core minio.Core, bucket, key, uploadID string) {
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), abortTimeout)
	defer cancel()
	for {
		err := core.AbortMultipartUpload(actx, bucket, key, uploadID)
		if err == nil || uploadGone(err) {
			return
		}
		select {
		case <-actx.Done():
			return
		case <-time.After(time.Second):
		}
	}
}

// Abort removes an upload a writer left behind, by its id: the parts of
// no other upload of the key are touched. An upload already completed or
// aborted is not an error.
func (s *Store) Abort(ctx context.Context, bucket, key, uploadID string) error {
	core := minio.Core{Client: s.client}
	if err := core.AbortMultipartUpload(ctx, bucket, key, uploadID); err != nil && !uploadGone(err) {
		return fmt.Errorf("abort upload %s of %s/%s: %w", uploadID, bucket, key, err)
	}
	return nil
}

// uploadGone reports whether err says the upload is no longer there to
// abort: completed, aborted, or its bucket removed.
func uploadGone(err error) bool {
	return IsNotFound(err) || errorResponse(err).Code == "NoSuchUpload"
}

// Pending is a multipart upload not yet completed or aborted.
type Pending struct {
	UploadID  string
	Initiated time.Time
}

// Pending lists the uploads of exactly key that are not yet completed or
// aborted.
func (s *Store) Pending(ctx context.Context, bucket, key string) ([]Pending, error) {
	var out []Pending
	for u := range s.client.ListIncompleteUploads(ctx, bucket, key, false) {
		if u.Err != nil {
			return nil, fmt.Errorf("list uploads of %s/%s: %w", bucket, key, u.Err)
		}
		if u.Key == key {
			out = append(out, Pending{UploadID: u.UploadID, Initiated: u.Initiated})
		}
	}
	return out, nil
}
