package events

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// SpecVersion is the CloudEvents version every imagepipe event declares.
const SpecVersion = "1.0"

// Event is a CloudEvents 1.0 envelope in structured JSON mode. Data holds the
// type-specific payload (ConvertJob, Converted, Failed, ...).
type Event struct {
	SpecVersion     string          `json:"specversion"`
	ID              string          `json:"id"`
	Source          string          `json:"source"`
	Type            string          `json:"type"`
	Time            time.Time       `json:"time"`
	Subject         string          `json:"subject,omitempty"`
	DataContentType string          `json:"datacontenttype,omitempty"`
	Data            json.RawMessage `json:"data"`
}

// New wraps data in an envelope. The id is the caller's: imagepipe derives
// ids from the job so that a redelivered job republishes the same id and
// JetStream's duplicate window drops the copy.
func New(id, typ, source, subject string, at time.Time, data any) (Event, error) {
	raw, err := json.Marshal(data)
	if err != nil {
		return Event{}, fmt.Errorf("encode %s data: %w", typ, err)
	}
	return Event{
		SpecVersion:     SpecVersion,
		ID:              id,
		Source:          source,
		Type:            typ,
		Time:            at.UTC(),
		Subject:         subject,
		DataContentType: "application/json",
		Data:            raw,
	}, nil
}

// Decode parses a structured-mode CloudEvent and checks the attributes the
// specification makes mandatory.
func Decode(b []byte) (Event, error) {
	var e Event
	if err := json.Unmarshal(b, &e); err != nil {
		return Event{}, fmt.Errorf("decode cloudevent: %w", err)
	}
	switch {
	case e.SpecVersion != SpecVersion:
		return Event{}, fmt.Errorf("decode cloudevent: specversion %q, want %q", e.SpecVersion, SpecVersion)
	case e.ID == "", e.Source == "", e.Type == "":
		return Event{}, errors.New("decode cloudevent: id, source and type are required")
	}
	return e, nil
}

// DecodeData unmarshals the payload into v after checking the event type, so
// a message on the wrong subject is refused instead of half-parsed.
func (e Event) DecodeData(typ string, v any) error {
	if e.Type != typ {
		return fmt.Errorf("event %s has type %q, want %q", e.ID, e.Type, typ)
	}
	if err := json.Unmarshal(e.Data, v); err != nil {
		return fmt.Errorf("decode %s data: %w", e.Type, err)
	}
	return nil
}

// Message is an event bound for a subject. Handlers return messages; the
// runtime publishes them with the event id as Nats-Msg-Id.
type Message struct {
	Subject string
	Event   Event
}
