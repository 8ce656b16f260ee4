package natstest

import (
	"bytes"
	"sync"
)

// LogBuffer is a log destination a test reads while the code under test
// writes to it from goroutines of its own: a function's slog handler, a
// server's logger.
type LogBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *LogBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String is everything written so far.
func (b *LogBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
