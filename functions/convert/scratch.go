package convert

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Each job's scratch directory holds a lock file that its process keeps
// locked for the life of the job. A process killed with -9 runs no
// deferred cleanup, but the kernel drops its locks: a job directory whose
// lock can be taken belongs to nobody and is removed. This works for any
// number of replicas sharing one scratch directory.
const (
	jobDirPrefix = "imagepipe-job-"
	lockName     = ".lock"
	// lockGrace covers the moment between creating a job directory and
	// locking it.
	lockGrace = time.Minute
)

// newJobDir creates and locks a job's scratch directory. release unlocks
// and removes it.
func newJobDir(scratch string) (dir string, release func(), err error) {
	dir, err = os.MkdirTemp(scratch, jobDirPrefix)
	if err != nil {
		return "", nil, err
	}
	lock, err := os.OpenFile(filepath.Join(dir, lockName), os.O_CREATE|os.O_RDWR, 0o600)
	if err == nil {
		err = syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
	}
	if err != nil {
		if lock != nil {
			lock.Close()
		}
		os.RemoveAll(dir)
		return "", nil, fmt.Errorf("lock scratch dir: %w", err)
	}
	return dir, func() {
		os.RemoveAll(dir)
		lock.Close()
	}, nil
}

// sweepScratch removes the job directories of processes that died, and
// returns their names and the output uploads those jobs started, named or
// not (see readUploadNotes), which only their writer could otherwise have
// aborted.
func sweepScratch(scratch string, now time.Time) (removed []string, uploads, unnamed []notedUpload) {
	entries, err := os.ReadDir(scratch)
	if err != nil {
		return nil, nil, nil
	}
	for _, e := range entries {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), jobDirPrefix) {
			continue
		}
		dir := filepath.Join(scratch, e.Name())
		if abandoned(dir, now) {
			named, waiting := readUploadNotes(dir)
			removeSocketDir(dir)
			if os.RemoveAll(dir) == nil {
				removed = append(removed, e.Name())
				uploads = append(uploads, named...)
				unnamed = append(unnamed, waiting...)
			}
		}
	}
	return removed, uploads, unnamed
}

// uploadsNote lists, in a job's scratch dir, the output uploads the job
// started, a JSON object a line: one line as an upload is about to start,
// and one with its id as soon as the server has given it.
const uploadsNote = "uploads"

// notedUpload is one output upload a job started. Without UploadID, it is
// one about to start, at Since.
type notedUpload struct {
	Bucket   string    `json:"bucket"`
	Key      string    `json:"key"`
	UploadID string    `json:"upload_id,omitempty"`
	Since    time.Time `json:"since,omitzero"`
}

// noteUpload records an upload of the job in dir: if the process dies
// mid-upload, the sweep that removes its scratch aborts that upload, and
// no other writer's of the same key.
func noteUpload(dir string, u notedUpload) error {
	line, err := json.Marshal(u)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(dir, uploadsNote), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(append(line, '\n'))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// readUploadNotes returns the uploads the job in dir named, and those it
// was about to start but never named: a process killed between the
// server creating an upload and the note of its id leaves one of those.
func readUploadNotes(dir string) (named, unnamed []notedUpload) {
	b, err := os.ReadFile(filepath.Join(dir, uploadsNote))
	if err != nil {
		return nil, nil
	}
	// Each key is written by one upload at a time: an intent is named by
	// the next line with an id for the same key.
	waiting := map[string]notedUpload{}
	for _, line := range bytes.Split(b, []byte("\n")) {
		var u notedUpload
		// A line cut short by the death of its writer is skipped: its
		// intent line came first, so the upload is still looked for.
		if json.Unmarshal(line, &u) != nil {
			continue
		}
		k := u.Bucket + "/" + u.Key
		if u.UploadID == "" {
			waiting[k] = u
			continue
		}
		delete(waiting, k)
		named = append(named, u)
	}
	for _, u := range waiting {
		unnamed = append(unnamed, u)
	}
	return named, unnamed
}

// liveUploadIDs are the uploads that jobs still running in scratch named.
func liveUploadIDs(scratch string) map[string]bool {
	ids := map[string]bool{}
	entries, _ := os.ReadDir(scratch)
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), jobDirPrefix) {
			named, _ := readUploadNotes(filepath.Join(scratch, e.Name()))
			for _, u := range named {
				ids[u.UploadID] = true
			}
		}
	}
	return ids
}

func abandoned(dir string, now time.Time) bool {
	lock, err := os.Open(filepath.Join(dir, lockName))
	if errors.Is(err, os.ErrNotExist) {
		info, err := os.Stat(dir)
		return err == nil && now.Sub(info.ModTime()) > lockGrace
	}
	if err != nil {
		return false
	}
	defer lock.Close()
	if syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) != nil {
		return false // a live job holds it
	}
	_ = syscall.Flock(int(lock.Fd()), syscall.LOCK_UN)
	return true
}
