package scratch

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// deadJobDir makes, in root, the dir of a job whose lock nobody holds, as
// a killed process leaves.
func deadJobDir(t *testing.T, root string) string {
	t.Helper()
	dead, err := os.MkdirTemp(root, JobDirPrefix)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dead, LockName), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return dead
}

func TestScratchOfADeadProcessIsSweptAndALiveJobsIsKept(t *testing.T) {
	root := t.TempDir()
	live, release, err := NewJobDir(root)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release)
	dead := deadJobDir(t, root)
	removed, _, _ := SweepJobDirs(root, time.Now())
	if len(removed) != 1 || !strings.HasSuffix(dead, removed[0]) {
		t.Errorf("removed %v, want only %s", removed, dead)
	}
	if _, err := os.Stat(live); err != nil {
		t.Errorf("the live job's dir was removed: %v", err)
	}
}

func TestSweepRemovesTheSocketDirOfADeadJobAndNothingElse(t *testing.T) {
	tmp, root := t.TempDir(), t.TempDir()
	t.Setenv("TMPDIR", tmp)
	sockets, err := os.MkdirTemp("", tempSocketDir)
	if err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(tmp, "precious")
	if err := os.Mkdir(other, 0o700); err != nil {
		t.Fatal(err)
	}
	for note, dir := range map[string]string{"socket": sockets, "other": other} {
		if err := os.WriteFile(filepath.Join(deadJobDir(t, root), socketDirNote), []byte(dir), 0o600); err != nil {
			t.Fatalf("%s: %v", note, err)
		}
	}
	if removed, _, _ := SweepJobDirs(root, time.Now()); len(removed) != 2 {
		t.Fatalf("removed %v, want both dead job dirs", removed)
	}
	if _, err := os.Stat(sockets); !os.IsNotExist(err) {
		t.Errorf("socket dir of a dead job still there (%v)", err)
	}
	if _, err := os.Stat(other); err != nil {
		t.Errorf("a noted dir that is no socket dir was removed: %v", err)
	}
}
