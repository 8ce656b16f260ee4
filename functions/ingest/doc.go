// Package ingest is the only door from the input bucket into the pipeline:
// it turns MinIO's object-created notifications into convert jobs, after
// deciding which notifications deserve one.
package ingest
