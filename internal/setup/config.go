package setup

import (
	"errors"
	"strconv"

	"github.com/imagepipe/imagepipe/internal/config"
)

// Validate refuses replicas JetStream cannot make and a window of nothing,
// before any stream is touched.
func (cfg StreamConfig) Validate() error {
	var problems []error
	if cfg.Replicas < 1 || cfg.Replicas > 5 {
		problems = append(problems, config.Invalid("IMAGEPIPE_STREAM_REPLICAS", strconv.Itoa(cfg.Replicas), "want 1 to 5 (JetStream's limit; 3 in a cluster)"))
	}
	problems = append(problems, config.Positive("IMAGEPIPE_DEDUP_WINDOW", cfg.DedupWindow))
	return errors.Join(problems...)
}
