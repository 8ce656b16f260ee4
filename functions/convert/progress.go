package convert

import (
	"context"
	"sync"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/inspect"
)

// tracker records one job's state for people watching, with the
// upload's format once inspection knows it. Each stage is handed one.
type tracker struct {
	h      *Handler
	j      *job
	format inspect.Format
}

func (h *Handler) track(j *job, format inspect.Format) tracker {
	return tracker{h: h, j: j, format: format}
}

// set records state at percent. A write that would say nothing new (the
// same state and percent as the last, moments ago) is not made: people
// watching see no change, and a live delivery's record still moves often
// enough for a redelivery to tell it from a dead one.
func (t tracker) set(ctx context.Context, state events.State, percent float64) {
	now := t.h.now()
	if !t.j.last.change(state, percent, now) {
		return
	}
	t.h.record(ctx, t.j, events.Status{
		Bucket: t.j.Bucket, Key: t.j.Key, JobID: t.j.JobID, State: state, Percent: percent,
		InputFormat: string(t.format), Attempt: t.j.attempt, UpdatedAt: now.UTC(),
	})
}

// lastStatus is the last state and percent a job recorded, and when.
type lastStatus struct {
	mu      sync.Mutex
	state   events.State
	percent float64
	at      time.Time
}

// sameStatusFor is how long a record that says nothing new is not
// written again: a few meter intervals, far less than half of any AckWait.
const sameStatusFor = 4 * meterInterval

// change notes a write of state at percent and reports whether it says
// something the last write did not.
func (l *lastStatus) change(state events.State, percent float64, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if state == l.state && percent == l.percent && now.Sub(l.at) < sameStatusFor {
		return false
	}
	l.state, l.percent, l.at = state, percent, now
	return true
}

// meter turns byte counts or percentages of one stage into status updates
// and progress events, at most a few times a second: watchers want a live
// figure, not a write per chunk.
type meter struct {
	tr    tracker
	ctx   context.Context
	phase events.Phase
	state events.State
	total int64
	start time.Time

	mu   sync.Mutex
	done int64
	last time.Time
}

const meterInterval = 250 * time.Millisecond

func (t tracker) meter(ctx context.Context, phase events.Phase, state events.State, total int64) *meter {
	return &meter{tr: t, ctx: ctx, phase: phase, state: state, total: total, start: t.h.now()}
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
	now := m.tr.h.now()
	m.mu.Lock()
	if !force && now.Sub(m.last) < meterInterval {
		m.mu.Unlock()
		return
	}
	m.last = now
	m.mu.Unlock()

	m.tr.set(m.ctx, m.state, pct)
	j := m.tr.j
	p := events.Progress{JobID: j.JobID, Bucket: j.Bucket, Key: j.Key, Phase: m.phase,
		Percent: pct, BytesDone: done, BytesTotal: m.total}
	if elapsed := now.Sub(m.start).Seconds(); elapsed > 0 && done > 0 {
		p.RateBPS = float64(done) / elapsed
		if p.RateBPS > 0 {
			p.ETASeconds = float64(m.total-done) / p.RateBPS
		}
	}
	_ = j.report.Progress(p)
}
