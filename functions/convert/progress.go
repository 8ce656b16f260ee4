package convert

import (
	"context"
	"sync"
	"time"

	"github.com/imagepipe/imagepipe/events"
)

// meter turns byte counts or percentages of one stage into status updates
// and progress events, at most a few times a second: watchers want a live
// figure, not a write per chunk.
type meter struct {
	h     *Handler
	ctx   context.Context
	j     *job
	phase events.Phase
	state events.State
	total int64
	start time.Time

	mu   sync.Mutex
	done int64
	last time.Time
}

const meterInterval = 250 * time.Millisecond

func (h *Handler) newMeter(ctx context.Context, j *job, phase events.Phase, state events.State, total int64) *meter {
	return &meter{h: h, ctx: ctx, j: j, phase: phase, state: state, total: total, start: h.now()}
}

// Write counts bytes passing through (download: io.Writer in a tee).
func (m *meter) Write(p []byte) (int, error) {
	m.add(int64(len(p)))
	return len(p), nil
}

// Read counts bytes sent (upload: minio-go reads its Progress reader by
// the number of bytes it has sent).
func (m *meter) Read(p []byte) (int, error) {
	m.add(int64(len(p)))
	return len(p), nil
}

func (m *meter) add(n int64) {
	m.mu.Lock()
	m.done += n
	done := m.done
	m.mu.Unlock()
	pct := 100.0
	if m.total > 0 {
		pct = min(100, float64(done)*100/float64(m.total))
	}
	m.report(pct, done, false)
}

// percent takes qemu-img's own percentage.
func (m *meter) percent(pct float64) {
	m.report(pct, int64(float64(m.total)*pct/100), pct >= 100)
}

func (m *meter) report(pct float64, done int64, force bool) {
	now := m.h.now()
	m.mu.Lock()
	if !force && now.Sub(m.last) < meterInterval {
		m.mu.Unlock()
		return
	}
	m.last = now
	m.mu.Unlock()

	m.h.setState(m.ctx, m.j, m.state, pct)
	p := events.Progress{JobID: m.j.JobID, Bucket: m.j.Bucket, Key: m.j.Key, Phase: m.phase,
		Percent: pct, BytesDone: done, BytesTotal: m.total}
	if elapsed := now.Sub(m.start).Seconds(); elapsed > 0 && done > 0 {
		p.RateBPS = float64(done) / elapsed
		if p.RateBPS > 0 {
			p.ETASeconds = float64(m.total-done) / p.RateBPS
		}
	}
	_ = m.h.report.Progress(p)
}
