// Package stack runs the real imagepipe system the way an operator does:
// an embedded NATS JetStream server and a MinIO child process that can both
// be restarted on the same port and data, and each function as its own
// `imagepipe` OS process that can be killed with SIGKILL. The fault suite
// (test/chaos), the load test (test/load) and the benchmark report (bench)
// share it, together with the disk images they feed it.
//
// It is also where a test package gets its real S3: Main, as the package's
// TestMain, gives it one MinIO for all its tests (PackageMinIO), while
// each test starts its own JetStream with natstest.Start. Every test
// deadline goes through Scaled, so that one factor stretches them all on
// a loaded machine.
package stack
