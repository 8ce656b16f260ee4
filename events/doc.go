// Package events is imagepipe's public contract: the CloudEvents envelope,
// types and sources, the stream, subject, consumer, key-value bucket and
// control names, the object metadata and tag keys, the reserved key
// prefixes, the failure rules, every message that crosses a subject, and
// the parser for MinIO's bucket notification. Each string is written here
// once; contract_test.go holds the rest of the module to that. It imports
// nothing from NATS or MinIO, so any program that speaks to imagepipe can
// depend on it alone.
package events
