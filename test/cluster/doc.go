// Package cluster holds the test that runs imagepipe as it runs in
// production: a three-node NATS JetStream cluster with the accounts of
// infra/nats, a MinIO server, and every function as a separate process of
// the built binary, while parts of it are killed.
package cluster
