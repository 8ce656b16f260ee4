package scratch

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// longDir is a directory whose path is too long for a socket in it.
func longDir(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), strings.Repeat("d", 100))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	return dir
}

// shortDir is a directory whose path leaves room for a socket in it:
// t.TempDir's, named after the test, may not.
func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "s")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func TestListenPutsTheSocketInTheJobDirWhereItFits(t *testing.T) {
	jobDir := shortDir(t)
	socket, l, done, err := Listen(jobDir)
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(socket) != jobDir {
		t.Errorf("socket %s, want it in %s", socket, jobDir)
	}
	c, err := net.Dial("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	l.Close()
	done()
	if _, err := os.Stat(filepath.Join(jobDir, socketDirNote)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a socket dir was noted for a socket in the job dir: %v", err)
	}
}

func TestListenFallsBackToAPrivateTempDirThatTheJobDirNotes(t *testing.T) {
	tmp := shortDir(t)
	t.Setenv("TMPDIR", tmp)
	jobDir := longDir(t)
	socket, _, done, err := Listen(jobDir)
	if err != nil {
		t.Fatalf("Listen in %s with TMPDIR %s: %v", jobDir, tmp, err)
	}
	dir := filepath.Dir(socket)
	if filepath.Dir(dir) != tmp || !strings.HasPrefix(filepath.Base(dir), tempSocketDir) {
		t.Errorf("socket %s, want it in a dir of its own in %s", socket, tmp)
	}
	if info, err := os.Stat(dir); err != nil || info.Mode().Perm() != 0o700 {
		t.Errorf("socket dir %v (%v), want one only its owner can enter", info, err)
	}
	if note, err := os.ReadFile(filepath.Join(jobDir, socketDirNote)); err != nil || string(note) != dir {
		t.Errorf("job dir notes %q (%v), want %s", note, err, dir)
	}
	done()
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket dir still there once done: %v", err)
	}
}

func TestListenReturnsErrNoSocketWhereNoPathFits(t *testing.T) {
	t.Setenv("TMPDIR", longDir(t))
	jobDir := longDir(t)
	if _, _, _, err := Listen(jobDir); !errors.Is(err, ErrNoSocket) {
		t.Fatalf("Listen = %v, want ErrNoSocket", err)
	}
	if entries, _ := os.ReadDir(jobDir); len(entries) != 0 {
		t.Errorf("job dir holds %v after a Listen that made nothing", entries)
	}
}
