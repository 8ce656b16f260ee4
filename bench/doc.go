// Package bench measures imagepipe against the baselines its users would
// compare it with, each figure named after what it measures and each a
// ratio of runs made side by side in one invocation: a large sparse image
// and a very sparse large image, end to end against a sequential
// download, qemu-img convert and upload (and against the pipeline
// uploading only once it has converted); the per-job overhead on small
// images; a burst's throughput against the bare stages (the project's own
// download, qemu-img and upload without the pipeline, at the same
// concurrency); and a convert replica's peak memory, all on one MinIO and
// one disk. `go tool task
// bench` runs it and writes REPORT.md. The hot pure functions also have
// ordinary `go test -bench` benchmarks here.
package bench
