// Package cluster holds the test that runs imagepipe as it runs in
// production: a three-node NATS JetStream cluster with the accounts of
// infra/nats, a distributed MinIO of four erasure-coded nodes, and every
// function as a separate process of the built binary, while parts of it
// are killed. `go tool task test` runs the reduced size (30 images);
// `go tool task chaos` the full one (CLUSTER_IMAGES, 90).
package cluster
