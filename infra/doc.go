// Package infra holds imagepipe's deployment files: NATS server configs and
// accounts (nats/), MinIO notification settings and policies (minio/),
// systemd units (systemd/) and the compose stack's environment (compose/).
// Its Go code runs those files for real in tests: a server config from
// nats/ on loopback ports, as the cluster test and this package's own tests
// do, so a file that would not start in production fails here first.
package infra
