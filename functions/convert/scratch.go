package convert

import (
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

// sweepScratch removes the job directories of processes that died.
func sweepScratch(scratch string, now time.Time) (removed []string) {
	entries, err := os.ReadDir(scratch)
	if err != nil {
		return nil
	}
	for _, e := range entries {
		if !e.IsDir() || !strings.HasPrefix(e.Name(), jobDirPrefix) {
			continue
		}
		dir := filepath.Join(scratch, e.Name())
		if abandoned(dir, now) {
			removeSocketDir(dir)
			if os.RemoveAll(dir) == nil {
				removed = append(removed, e.Name())
			}
		}
	}
	return removed
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
