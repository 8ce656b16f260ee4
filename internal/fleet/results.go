package fleet

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
)

// Fleet statistics are derived from the RESULTS stream each time they are
// asked for, not kept as counters in a key-value bucket:
//
//   - Exact. Every converted and failed event is in the stream once (the
//     duplicate window drops republished ids, and Aggregator drops any
//     that slip past it), so a count is never lost to a replica dying
//     between its publish and a counter update, and never doubled by a
//     redelivered job. Counters in KV would need a compare-and-swap loop
//     shared by every replica and still drift on exactly those crashes.
//   - Durable for free. The stream is the record; any replica, or a CLI
//     with no replica running at all, reads the same numbers after any
//     restart.
//   - Cheap enough. RESULTS keeps 30 days; an ordered consumer reads tens
//     of thousands of small events a second, and only when an operator
//     asks. Percentiles come out exact, which a compact aggregate cannot
//     give.
//
// The price is that the statistics cover the stream's retention window.

// Outcomes counts the results of a set of jobs: the whole fleet's, or one
// input format's.
type Outcomes struct {
	Converted  int64 `json:"converted"`
	Duplicates int64 `json:"duplicates"`
	Failed     int64 `json:"failed"`
	Cancelled  int64 `json:"cancelled"`
	Retried    int64 `json:"retried"`
	// SuccessRate is (Converted + Duplicates) / (Converted + Duplicates +
	// Failed); 0 when there is nothing to rate.
	SuccessRate float64 `json:"success_rate"`
}

func (o *Outcomes) rate() { o.SuccessRate = rate(o.Converted+o.Duplicates, o.Failed) }

// FormatStats are the outcomes of one input format.
type FormatStats struct {
	Outcomes
}

// ResultStats are the fleet's outcomes over the results stream.
type ResultStats struct {
	// Events is how many result events were read; From and To are the
	// first and last event times, the window the numbers cover.
	Events int64     `json:"events"`
	From   time.Time `json:"from,omitzero"`
	To     time.Time `json:"to,omitzero"`
	// Processed counts final outcomes: Converted + Duplicates + Failed +
	// Cancelled. Retried counts failed attempts that were tried again; they
	// are not failures.
	Processed int64 `json:"processed"`
	Outcomes
	// Conversion times of converted (not duplicate) results.
	AvgSeconds float64 `json:"avg_seconds"`
	P50Seconds float64 `json:"p50_seconds"`
	P95Seconds float64 `json:"p95_seconds"`
	// BytesIn is the size of the inputs converted, BytesOut of the outputs.
	BytesIn  int64 `json:"bytes_in"`
	BytesOut int64 `json:"bytes_out"`
	// BytesZero is the part of BytesOut that was runs of zeros copied
	// server-side from the zero object instead of sent, and ZeroFraction
	// is BytesZero / BytesOut: how much of what the fleet stores its
	// uploads never carried.
	BytesZero    int64                   `json:"bytes_zero"`
	ZeroFraction float64                 `json:"zero_fraction"`
	ByFormat     map[string]*FormatStats `json:"by_format"`
}

// Aggregator folds result events into ResultStats.
type Aggregator struct {
	s         ResultStats
	seen      map[string]bool
	inputSeen map[string]bool
	durations []int64
}

// NewAggregator returns an empty aggregator.
func NewAggregator() *Aggregator {
	return &Aggregator{
		s:         ResultStats{ByFormat: map[string]*FormatStats{}},
		seen:      map[string]bool{},
		inputSeen: map[string]bool{},
	}
}

// Add folds in one message of the results stream. Anything that is not a
// converted or failed event is ignored.
func (a *Aggregator) Add(data []byte) {
	ev, err := events.Decode(data)
	if err != nil || a.seen[ev.ID] {
		return
	}
	switch ev.Type {
	case events.TypeConverted:
		var c events.Converted
		if ev.DecodeData(events.TypeConverted, &c) != nil {
			return
		}
		f := a.format(c.InputFormat)
		if c.DuplicateOf != "" {
			a.s.Duplicates++
			f.Duplicates++
		} else {
			a.s.Converted++
			f.Converted++
			a.durations = append(a.durations, c.DurationMS)
		}
		// An OVA's disks are one input with several results: its size
		// counts once.
		if !a.inputSeen[c.JobID] {
			a.inputSeen[c.JobID] = true
			a.s.BytesIn += c.InputSize
		}
		a.s.BytesOut += c.OutputSize
		a.s.BytesZero += c.ZeroBytes()
	case events.TypeFailed:
		var fl events.Failed
		if ev.DecodeData(events.TypeFailed, &fl) != nil {
			return
		}
		f := a.format(fl.InputFormat)
		switch {
		case fl.Rule == events.RuleCancelled:
			a.s.Cancelled++
			f.Cancelled++
		case fl.WillRetry:
			a.s.Retried++
			f.Retried++
		default:
			a.s.Failed++
			f.Failed++
		}
	default:
		return
	}
	a.seen[ev.ID] = true
	a.s.Events++
	if a.s.From.IsZero() || ev.Time.Before(a.s.From) {
		a.s.From = ev.Time
	}
	if ev.Time.After(a.s.To) {
		a.s.To = ev.Time
	}
}

func (a *Aggregator) format(name string) *FormatStats {
	if name == "" {
		name = "unknown"
	}
	f := a.s.ByFormat[name]
	if f == nil {
		f = &FormatStats{}
		a.s.ByFormat[name] = f
	}
	return f
}

// Stats returns the statistics of everything added so far.
func (a *Aggregator) Stats() ResultStats {
	s := a.s
	s.ByFormat = make(map[string]*FormatStats, len(a.s.ByFormat))
	for k, v := range a.s.ByFormat {
		f := *v
		f.rate()
		s.ByFormat[k] = &f
	}
	s.Processed = s.Converted + s.Duplicates + s.Failed + s.Cancelled
	s.rate()
	if s.BytesOut > 0 {
		s.ZeroFraction = float64(s.BytesZero) / float64(s.BytesOut)
	}
	if n := len(a.durations); n > 0 {
		d := slices.Clone(a.durations)
		slices.Sort(d)
		var sum int64
		for _, v := range d {
			sum += v
		}
		s.AvgSeconds = float64(sum) / float64(n) / 1000
		s.P50Seconds = float64(percentile(d, 50)) / 1000
		s.P95Seconds = float64(percentile(d, 95)) / 1000
	}
	return s
}

func rate(ok, failed int64) float64 {
	if ok+failed == 0 {
		return 0
	}
	return float64(ok) / float64(ok+failed)
}

// percentile is the nearest-rank percentile of sorted values.
func percentile(sorted []int64, p int) int64 {
	rank := max((p*len(sorted)+99)/100, 1)
	return sorted[rank-1]
}

// ReadResults reads the whole results stream, up to its last message at
// the time of the call, and returns the statistics.
func ReadResults(ctx context.Context, js jetstream.JetStream) (ResultStats, error) {
	agg := NewAggregator()
	stream, err := js.Stream(ctx, events.StreamResults)
	if err != nil {
		return ResultStats{}, fmt.Errorf("read results: %w", err)
	}
	// The last result, not the stream's last message: the stream keeps the
	// watchdog's alerts too, which the filter below skips, and a read that
	// waited for one of them would wait forever.
	lastMsg, err := stream.GetLastMsgForSubject(ctx, events.SubjectResults)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return agg.Stats(), nil
	}
	if err != nil {
		return ResultStats{}, fmt.Errorf("read results: %w", err)
	}
	last := lastMsg.Sequence
	// An ordered consumer is ephemeral and flow-controlled: nothing is left
	// behind on the server, and a gap is recovered by the library.
	cons, err := js.OrderedConsumer(ctx, events.StreamResults, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{events.SubjectResults},
		DeliverPolicy:  jetstream.DeliverAllPolicy,
	})
	if err != nil {
		return ResultStats{}, fmt.Errorf("read results: %w", err)
	}
	it, err := cons.Messages(jetstream.PullMaxMessages(512))
	if err != nil {
		return ResultStats{}, fmt.Errorf("read results: %w", err)
	}
	defer it.Stop()
	for {
		msg, err := it.Next(jetstream.NextContext(ctx))
		if err != nil {
			if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
				return ResultStats{}, fmt.Errorf("read results: %w", ctx.Err())
			}
			return ResultStats{}, fmt.Errorf("read results: %w", err)
		}
		agg.Add(msg.Data())
		md, err := msg.Metadata()
		if err != nil || md.Sequence.Stream >= last {
			return agg.Stats(), nil
		}
	}
}
