package metrics

import (
	"net"

	"github.com/imagepipe/imagepipe/internal/config"
)

// Config turns the listener on.
type Config struct {
	// Addr is host:port for /metrics, /healthz and /readyz; empty is off.
	Addr string `env:"IMAGEPIPE_METRICS_ADDR" doc:"host:port of the Prometheus /metrics, /healthz and /readyz listener, such as :9477; empty is off; one per process (imagepipe dev serves its three functions on one)" takes:"host:port or :port"`
}

// Validate refuses an address that could never be listened on.
func (c Config) Validate() error {
	if c.Addr == "" {
		return nil
	}
	if _, port, err := net.SplitHostPort(c.Addr); err != nil || port == "" {
		return config.Invalid("IMAGEPIPE_METRICS_ADDR", c.Addr, "want host:port or :port, such as :9477")
	}
	return nil
}
