// Package events is imagepipe's public contract: the CloudEvents envelope,
// the stream and subject names, every message that crosses a subject, and the
// parser for MinIO's bucket notification. It imports nothing from NATS or
// MinIO, so any program that speaks to imagepipe can depend on it alone.
package events
