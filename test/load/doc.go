// Package load measures a burst: many small images of mixed formats
// uploaded at once, converted with 1, 2 and 4 jobs per convert replica;
// it reports throughput and upload-to-result latency percentiles and
// fails on any loss or error. It is built only with the "load" tag
// (`go tool task load`), being minutes of work.
package load
