package scratch

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Each job's scratch directory holds a lock file that its process keeps
// locked for the life of the job. A process killed with -9 runs no
// deferred cleanup, but the kernel drops its locks: a job directory whose
// lock can be taken belongs to nobody and is removed. This works for any
// number of replicas sharing one scratch directory, so the names are a
// layout every replica, of any version, reads the same way.
const (
	// JobDirPrefix begins the name of every job directory.
	JobDirPrefix = "imagepipe-job-"
	// LockName is the lock file in a job directory.
	LockName = ".lock"
	// lockGrace covers the moment between creating a job directory and
	// locking it.
	lockGrace = time.Minute
)

// NewJobDir creates and locks a job's directory in the scratch directory
// root. release unlocks and removes it.
func NewJobDir(root string) (dir string, release func(), err error) {
	dir, err = os.MkdirTemp(root, JobDirPrefix)
	if err != nil {
		return "", nil, err
	}
	lock, err := os.OpenFile(filepath.Join(dir, LockName), os.O_CREATE|os.O_RDWR, 0o600)
	if err == nil {
		err = tryLock(lock)
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

// SweepJobDirs removes the job directories in root of processes that
// died, with the socket directories they noted, and returns their names
// and the output uploads those jobs started, named or not (see
// readUploadNotes), which only their writer could otherwise have aborted.
func SweepJobDirs(root string, now time.Time) (removed []string, uploads, unnamed []NotedUpload) {
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil, nil, nil
	}
	for _, e := range entries {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), JobDirPrefix) {
			continue
		}
		dir := filepath.Join(root, e.Name())
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

// UploadsNote lists, in a job's directory, the output uploads the job
// started, a JSON object a line: one line as an upload is about to start,
// and one with its id as soon as the server has given it.
const UploadsNote = "uploads"

// NotedUpload is one output upload a job started. Without UploadID, it is
// one about to start, at Since.
type NotedUpload struct {
	Bucket   string    `json:"bucket"`
	Key      string    `json:"key"`
	UploadID string    `json:"upload_id,omitempty"`
	Since    time.Time `json:"since,omitzero"`
}

// NoteUpload records an upload of the job in dir: if the process dies
// mid-upload, the sweep that removes its directory returns that upload to
// be aborted, and no other writer's of the same key.
func NoteUpload(dir string, u NotedUpload) error {
	line, err := json.Marshal(u)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(filepath.Join(dir, UploadsNote), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
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
func readUploadNotes(dir string) (named, unnamed []NotedUpload) {
	b, err := os.ReadFile(filepath.Join(dir, UploadsNote))
	if err != nil {
		return nil, nil
	}
	// Each key is written by one upload at a time: an intent is named by
	// the next line with an id for the same key.
	waiting := map[string]NotedUpload{}
	for _, line := range bytes.Split(b, []byte("\n")) {
		var u NotedUpload
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

// LiveUploadIDs are the uploads that jobs still running in root named.
func LiveUploadIDs(root string) map[string]bool {
	ids := map[string]bool{}
	entries, _ := os.ReadDir(root)
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), JobDirPrefix) {
			named, _ := readUploadNotes(filepath.Join(root, e.Name()))
			for _, u := range named {
				ids[u.UploadID] = true
			}
		}
	}
	return ids
}

func abandoned(dir string, now time.Time) bool {
	lock, err := os.Open(filepath.Join(dir, LockName))
	if errors.Is(err, os.ErrNotExist) {
		info, err := os.Stat(dir)
		return err == nil && now.Sub(info.ModTime()) > lockGrace
	}
	if err != nil {
		return false
	}
	defer lock.Close()
	if tryLock(lock) != nil {
		return false // a live job holds it
	}
	_ = unlock(lock)
	return true
}
