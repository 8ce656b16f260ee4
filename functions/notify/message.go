package notify

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/imagepipe/imagepipe/events"
)

// Outcome is what happened, as far as a reader of a message cares.
type Outcome string

const (
	OutcomeConverted Outcome = "converted"
	OutcomeFailed    Outcome = "failed"
	OutcomeStalled   Outcome = "stalled"
	OutcomeRecovered Outcome = "recovered"
)

// Class is the routing class of an outcome: the word users put in
// IMAGEPIPE_NOTIFY_ON. A recovery travels with the stall it ends, so whoever
// was told about one hears about the other.
func (o Outcome) Class() string {
	switch o {
	case OutcomeConverted:
		return OnSuccess
	case OutcomeFailed:
		return OnFailure
	default:
		return OnStalled
	}
}

// Fact is one labelled value in a message.
type Fact struct {
	Name  string
	Value string
}

// Message is the rendered, channel-neutral content of one event. Channels
// lay it out in their own way; the webhook forwards Event untouched.
type Message struct {
	EventID string
	Outcome Outcome
	// Title is a short headline naming the image or queue.
	Title string
	// Summary is one sentence that stands alone where only a line fits: a
	// push notification, an email preview, a Slack fallback.
	Summary string
	// Facts are short values worth a column each.
	Facts []Fact
	// Notes are the longer texts a failure carries: what went wrong and what
	// to do about it.
	Notes []Fact
	Time  time.Time
	Event events.Event
}

// QueueAlert is the data of TypeStalled and TypeQueueRecover events.
type QueueAlert struct {
	Stream   string `json:"stream"`
	Consumer string `json:"consumer"`
	// QueueDepth is the jobs waiting plus the jobs handed out and not yet
	// finished.
	QueueDepth uint64 `json:"queue_depth"`
	// IdleMinutes is how long the queue had not moved: at the alert, so far;
	// at the recovery, in all.
	IdleMinutes int64 `json:"idle_minutes"`
	// LastActivity is when the queue last moved. For a stall it is also the
	// stall's identity: the same stall always has the same LastActivity.
	LastActivity time.Time `json:"last_activity"`
	// StalledSince is, in a recovery, the LastActivity of the stall it ends.
	StalledSince *time.Time `json:"stalled_since,omitempty"`
	// Orphaned counts the uploads whose status stands still in a
	// non-final state with no job in the queue (see package orphan): a
	// stall the queue itself cannot show. OrphanedKeys names the oldest.
	Orphaned     int      `json:"orphaned,omitempty"`
	OrphanedKeys []string `json:"orphaned_keys,omitempty"`
}

// render turns a decoded event into a Message. It reports notify=false for
// events that are news to nobody, such as a failure that will be retried.
func render(ev events.Event) (m Message, notify bool, err error) {
	switch ev.Type {
	case events.TypeConverted:
		return renderData(ev, renderConverted)
	case events.TypeFailed:
		return renderData(ev, renderFailed)
	case events.TypeStalled, events.TypeQueueRecover:
		return renderData(ev, renderQueueAlert)
	}
	return Message{}, false, fmt.Errorf("event %s: type %q is not a result or queue alert", ev.ID, ev.Type)
}

// renderData decodes ev's data into the type its renderer reads and hands
// the renderer a Message that already carries the event.
func renderData[T any](ev events.Event, r func(Message, T) (Message, bool)) (Message, bool, error) {
	var data T
	if err := ev.DecodeData(ev.Type, &data); err != nil {
		return Message{}, false, err
	}
	m, notify := r(Message{EventID: ev.ID, Time: ev.Time, Event: ev}, data)
	return m, notify, nil
}

func renderConverted(m Message, c events.Converted) (Message, bool) {
	m.Outcome = OutcomeConverted
	m.Title = "Converted " + c.InputKey
	m.Summary = fmt.Sprintf("%s/%s is ready at %s/%s (%s).", c.InputBucket, c.InputKey, c.OutputBucket, c.OutputKey, orUnknown(c.OutputFormat))
	m.Facts = []Fact{
		{"Image", c.InputBucket + "/" + c.InputKey},
		{"Input", formatAndSize(c.InputFormat, c.InputSize)},
		{"Output", formatAndSize(c.OutputFormat, c.OutputSize)},
		{"Location", c.OutputBucket + "/" + c.OutputKey},
		{"Duration", formatDuration(c.DurationMS)},
	}
	if c.VirtualSize > 0 {
		m.Facts = append(m.Facts, Fact{"Virtual size", formatBytes(c.VirtualSize)})
	}
	if c.SHA256 != "" {
		m.Facts = append(m.Facts, Fact{"SHA-256", c.SHA256})
	}
	if c.DuplicateOf != "" {
		// Said up front: the reader may otherwise wonder why a large
		// image "converted" in a second.
		m.Summary += " Same content as " + c.DuplicateOf + ", copied instead of converted."
		m.Facts = append(m.Facts, Fact{"Copied from", c.DuplicateOf})
	}
	m.Facts = append(m.Facts, Fact{"Job", c.JobID})
	return m, true
}

// renderFailed tells of a failure only once it is final: a retried one
// may yet convert.
func renderFailed(m Message, f events.Failed) (Message, bool) {
	m.Outcome = OutcomeFailed
	m.Title = "Failed to convert " + f.InputKey
	m.Summary = fmt.Sprintf("%s/%s failed in %s: %s", f.InputBucket, f.InputKey, orUnknown(string(f.Phase)), f.Message)
	m.Facts = []Fact{
		{"Image", f.InputBucket + "/" + f.InputKey},
		{"Input", orUnknown(f.InputFormat)},
		{"Phase", orUnknown(string(f.Phase))},
		{"Attempt", strconv.Itoa(f.Attempt)},
		{"Duration", formatDuration(f.DurationMS)},
	}
	if f.Rule != "" {
		m.Facts = append(m.Facts, Fact{"Rule", f.Rule})
	}
	if f.System != nil && f.System.Host != "" {
		m.Facts = append(m.Facts, Fact{"Host", f.System.Host})
	}
	m.Facts = append(m.Facts, Fact{"Job", f.JobID})
	m.Notes = []Fact{{"Error", orUnknown(f.Message)}}
	if f.Suggestion != "" {
		m.Notes = append(m.Notes, Fact{"Suggestion", f.Suggestion})
	}
	return m, !f.WillRetry
}

// renderQueueAlert renders a stall, or the recovery that ends one.
func renderQueueAlert(m Message, a QueueAlert) (Message, bool) {
	queue := a.Stream + "/" + a.Consumer
	m.Facts = []Fact{
		{"Queue", queue},
		{"Jobs waiting", strconv.FormatUint(a.QueueDepth, 10)},
	}
	if m.Event.Type == events.TypeStalled {
		m.Outcome = OutcomeStalled
		m.Title = "Conversion queue stalled"
		m.Summary = fmt.Sprintf("%d job(s) in %s have not moved for %d minutes.", a.QueueDepth, queue, a.IdleMinutes)
		m.Facts = append(m.Facts,
			Fact{"Idle for", fmt.Sprintf("%d min", a.IdleMinutes)},
			Fact{"Last activity", a.LastActivity.UTC().Format(time.RFC3339)})
		m.Notes = []Fact{{"Suggestion", "Check that convert replicas are running and can reach NATS and object storage (imagepipe ctl status)."}}
		if a.Orphaned > 0 {
			m.Summary += fmt.Sprintf(" %d upload(s) wait with no job in the queue at all.", a.Orphaned)
			m.Facts = append(m.Facts, Fact{"Uploads with no job", strconv.Itoa(a.Orphaned)})
			m.Notes = append(m.Notes, Fact{"Uploads with no job", strings.Join(a.OrphanedKeys, ", ") +
				"; run `imagepipe reconcile` to queue their jobs again (the periodic reconcile, IMAGEPIPE_RECONCILE_EVERY, does so on its own)"})
		}
	} else {
		m.Outcome = OutcomeRecovered
		m.Title = "Conversion queue moving again"
		m.Summary = fmt.Sprintf("%s is moving again after %d minutes; %d job(s) left.", queue, a.IdleMinutes, a.QueueDepth)
		m.Facts = append(m.Facts,
			Fact{"Stalled for", fmt.Sprintf("%d min", a.IdleMinutes)},
			Fact{"Moved at", a.LastActivity.UTC().Format(time.RFC3339)})
	}
	return m, true
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

func formatAndSize(format string, size int64) string {
	if size <= 0 {
		return orUnknown(format)
	}
	return orUnknown(format) + ", " + formatBytes(size)
}

// formatBytes uses binary units because disk sizes are powers of two and
// a 64 GiB disk should read as 64, not 68.7.
func formatBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatInt(n, 10) + " B"
	}
	div, exp := int64(unit), 0
	for v := n / unit; v >= unit && exp < 5; v /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func formatDuration(ms int64) string {
	if ms <= 0 {
		return "unknown"
	}
	d := time.Duration(ms) * time.Millisecond
	if d >= time.Minute {
		d = d.Round(time.Second)
	} else {
		d = d.Round(100 * time.Millisecond)
	}
	return d.String()
}
