package scratch

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
)

// qemu-img writes a streamed output into an NBD export served on a Unix
// socket. The socket lives in the job's directory, which is the job's
// own, so no other user can reach the export; but a socket address holds
// only a short path, and a scratch directory deep in a file system may be
// too long for one.

// maxSocketPath is what fits in a Unix socket address, with its NUL.
const maxSocketPath = 107

const (
	socketName    = "output.sock"
	tempSocketDir = "imagepipe-nbd-"
	// socketDirNote names, in a job's directory, the socket directory the
	// job made elsewhere.
	socketDirNote = "socket-dir"
)

// ErrNoSocket is Listen's answer where no directory has a path short
// enough for a socket.
var ErrNoSocket = errors.New("no directory with a path short enough for a socket")

// Listen opens a Unix socket for the job whose directory is jobDir: in
// jobDir, or where that path is too long for a socket address, in a
// private directory of the OS temp dir. Either is the job's own. It
// returns ErrNoSocket where neither fits. done closes the socket and
// removes what it made.
func Listen(jobDir string) (socket string, l net.Listener, done func(), err error) {
	dir, cleanup := jobDir, func() {}
	if len(filepath.Join(dir, socketName)) > maxSocketPath {
		// MkdirTemp appends at most 10 digits.
		if len(filepath.Join(os.TempDir(), tempSocketDir+"0123456789", socketName)) > maxSocketPath {
			return "", nil, nil, ErrNoSocket
		}
		if dir, err = os.MkdirTemp("", tempSocketDir); err != nil {
			return "", nil, nil, err
		}
		cleanup = func() { os.RemoveAll(dir) }
		// Noted in the job's dir, so that the sweep of a job whose process
		// died removes this one too.
		if err := os.WriteFile(filepath.Join(jobDir, socketDirNote), []byte(dir), 0o600); err != nil {
			cleanup()
			return "", nil, nil, err
		}
	}
	socket = filepath.Join(dir, socketName)
	if l, err = net.Listen("unix", socket); err != nil {
		cleanup()
		return "", nil, nil, err
	}
	return socket, l, func() { l.Close(); cleanup() }, nil
}

// removeSocketDir removes the socket directory a job noted in jobDir, if
// it is one Listen made.
func removeSocketDir(jobDir string) {
	b, err := os.ReadFile(filepath.Join(jobDir, socketDirNote))
	if err != nil {
		return
	}
	dir := filepath.Clean(string(b))
	if filepath.Dir(dir) == filepath.Clean(os.TempDir()) && strings.HasPrefix(filepath.Base(dir), tempSocketDir) {
		os.RemoveAll(dir)
	}
}
