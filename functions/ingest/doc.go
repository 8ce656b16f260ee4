// Package ingest is the only door from the input bucket into the pipeline:
// it turns MinIO's object-created notifications into convert jobs, after
// deciding by its intake rules which objects deserve one. The same rules
// serve the doors an operator opens by hand: re-convert, reconcile (for
// notifications MinIO lost) and import from a URL.
package ingest
