// Package scratch holds everything convert does with its local scratch
// space: the files a job writes and reads there, and the job directories
// they live in. The upload command reads the image it sends with File
// too.
//
// A job's scratch files are large, written once, read once or twice and
// deleted; each piece here exists to keep that cheap and to leave nothing
// behind:
//
//   - Direct I/O (direct.go, reader.go): Create, CreateWriterAt and the
//     readers underneath File and Stream use O_DIRECT, so a job neither
//     fills the page cache nor evicts what the host needs, and a virtual
//     machine does not fault every fresh cache page to its hypervisor.
//     Supported says whether qemu-img may be asked for the same (-t none).
//   - Sparse files (sparse.go, holes.go): a raw output is mostly holes.
//     File maps the data extents once (SEEK_DATA/SEEK_HOLE) and serves the
//     holes from memory, so hashing and uploading cost what the data
//     costs. Holes answers, for a file still being written, whether a
//     range is all zeros, so an upload can have the server copy it.
//   - The one-writer stream (stream.go): Stream lets the hash and the
//     upload read qemu-img's raw output behind it while it still converts,
//     and fails them if the writer ever goes back over what they read.
//   - Job directories (jobdir.go): NewJobDir gives each job a directory
//     locked for its life; SweepJobDirs removes those whose process died
//     (the kernel drops a dead process's lock), with what they noted:
//     the socket directory they made, and the uploads they started, which
//     the sweep returns for the caller to abort. DiskSpace says how much
//     room the scratch file system has left.
//   - Socket directories (socket.go): Listen opens the Unix socket
//     qemu-img writes its NBD output to, in the job's directory or, where
//     that path is too long for a socket address, in a private directory
//     of the OS temp dir that the job's directory notes for the sweep.
//
// The Linux-only parts (O_DIRECT, SEEK_DATA/SEEK_HOLE) are built on Linux
// without the build tag portable; elsewhere, and with -tags portable,
// every file goes through the page cache and is all data, as on a Linux
// file system without O_DIRECT or holes. Job locks use flock(2) wherever
// it exists (unix).
package scratch
