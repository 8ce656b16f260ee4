// Package bench measures imagepipe against the baselines issue 8 names:
// the pipeline end to end against a sequential download, qemu-img convert
// and upload, and against itself uploading a raw output only once it is
// converted rather than while it converts (P1), its overhead on small images (P2), its burst throughput
// against qemu-img alone (P3), and a convert replica's peak memory (P4),
// all in one run on one MinIO and one disk. `go tool task bench` runs it
// and writes REPORT.md. The hot pure functions also have ordinary
// `go test -bench` benchmarks here.
package bench
