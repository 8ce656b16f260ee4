// Package secrets refuses the placeholder secrets that imagepipe's example
// files ship with (infra/, README.md) and MinIO's well-known default
// credentials away from loopback, so that a deployment copied from the
// examples without editing them does not start with passwords everyone who
// has read the repository knows. The list of placeholders lives here and
// nowhere else.
package secrets
