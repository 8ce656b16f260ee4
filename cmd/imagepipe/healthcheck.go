package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/caarlos0/env/v11"
	"github.com/spf13/cobra"

	"github.com/imagepipe/imagepipe/internal/metrics"
)

const healthcheckLong = `Asks the function running beside it whether it is ready (GET /readyz on
its metrics listener) and exits 0 if it answers 200, 1 otherwise, printing
what it answered. Container images use it as their health check, so they
need no curl:

  HEALTHCHECK CMD ["imagepipe", "healthcheck"]

The address is --url, else IMAGEPIPE_METRICS_ADDR, as the function reads it
(a listener on all interfaces, such as :9090, is asked on 127.0.0.1).`

func newHealthcheckCmd(e *cliEnv) *cobra.Command {
	var (
		target  string
		timeout time.Duration
	)
	c := &cobra.Command{
		Use:     "healthcheck",
		Short:   "exit 0 if the local function's /readyz answers 200, for container health checks",
		Long:    healthcheckLong,
		Example: "  imagepipe healthcheck\n  imagepipe healthcheck --url http://127.0.0.1:9090/readyz",
		Args:    noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			u, err := healthURL(target)
			if err != nil {
				return err
			}
			if timeout <= 0 {
				return usageError{fmt.Sprintf("healthcheck: --timeout %s is not positive; want a duration such as 5s", timeout)}
			}
			return runHealthcheck(cmd.Context(), u, timeout, e.stdout)
		},
	}
	c.Flags().StringVar(&target, "url", "", "the URL to GET (default http://IMAGEPIPE_METRICS_ADDR/readyz)")
	c.Flags().DurationVar(&timeout, "timeout", 5*time.Second, "how long to wait for the answer")
	return c
}

// healthURL is the URL to ask: --url as given, else the metrics listener's
// /readyz, asked on loopback when it listens on every interface.
func healthURL(flagURL string) (string, error) {
	if flagURL != "" {
		u, err := url.Parse(flagURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return "", usageError{fmt.Sprintf("healthcheck: --url %q is not an http or https URL, such as http://127.0.0.1:9090/readyz", flagURL)}
		}
		return flagURL, nil
	}
	var cfg metrics.Config
	if err := env.Parse(&cfg); err != nil {
		return "", fmt.Errorf("configuration: %w", err)
	}
	if cfg.Addr == "" {
		return "", usageError{"healthcheck: IMAGEPIPE_METRICS_ADDR is not set, so the function serves no /readyz; set it for both, or pass --url"}
	}
	host, port, err := net.SplitHostPort(cfg.Addr)
	if err != nil {
		return "", usageError{fmt.Sprintf("healthcheck: IMAGEPIPE_METRICS_ADDR %q is not host:port, such as :9090 or 127.0.0.1:9090", cfg.Addr)}
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return "http://" + net.JoinHostPort(host, port) + "/readyz", nil
}

// runHealthcheck GETs u and succeeds on 200.
func runHealthcheck(ctx context.Context, u string, timeout time.Duration, stdout io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return fmt.Errorf("healthcheck %s: %w", u, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return fmt.Errorf("healthcheck: nothing answered at %s: %w", u, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	answer := strings.Join(strings.Fields(string(body)), " ")
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("healthcheck: %s answered %s: %s", u, resp.Status, answer)
	}
	fmt.Fprintln(stdout, answer)
	return nil
}
