// Package metrics exposes one process's Prometheus metrics, all named
// imagepipe_*, and its health: /metrics, /healthz (the process is alive)
// and /readyz (NATS connected, storage reachable, consumers bound). It is
// off unless IMAGEPIPE_METRICS_ADDR is set.
package metrics
