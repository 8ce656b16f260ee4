package setup

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Action is what setup did to one thing.
type Action string

// Actions.
const (
	Created   Action = "created"
	Updated   Action = "updated"
	Unchanged Action = "unchanged"
)

// Change is what setup did to one thing: a stream, a bucket, a rule.
type Change struct {
	Action Action
	Kind   string // stream, kv, bucket, lifecycle, notification
	Name   string
	// Detail says what an update changed.
	Detail string
}

// String reads as a line of `imagepipe setup`'s output:
// "created stream JOBS", "updated stream JOBS (replicas 1 → 3)",
// "unchanged: bucket uploads".
func (c Change) String() string {
	if c.Action == Unchanged {
		return fmt.Sprintf("unchanged: %s %s", c.Kind, c.Name)
	}
	s := fmt.Sprintf("%s %s %s", c.Action, c.Kind, c.Name)
	if c.Detail != "" {
		s += " (" + c.Detail + ")"
	}
	return s
}

// Report is every change of one run, in the order they were made.
type Report []Change

// Changed reports whether anything was created or updated.
func (r Report) Changed() bool {
	return slices.ContainsFunc(r, func(c Change) bool { return c.Action != Unchanged })
}

// streamDiff lists the settings imagepipe manages that differ.
func streamDiff(have, want jetstream.StreamConfig) []string {
	var d []string
	add := func(name string, a, b any) {
		if a != b {
			d = append(d, fmt.Sprintf("%s %v → %v", name, a, b))
		}
	}
	if !sameSet(have.Subjects, want.Subjects) {
		d = append(d, fmt.Sprintf("subjects %v → %v", have.Subjects, want.Subjects))
	}
	add("retention", have.Retention, want.Retention)
	add("storage", have.Storage, want.Storage)
	add("replicas", have.Replicas, want.Replicas)
	add("max age", have.MaxAge, keptAge(have.MaxAge, want.MaxAge))
	add("duplicate window", have.Duplicates, want.Duplicates)
	add("description", have.Description, want.Description)
	return d
}

func kvDiff(have, want jetstream.KeyValueConfig) []string {
	var d []string
	add := func(name string, a, b any) {
		if a != b {
			d = append(d, fmt.Sprintf("%s %v → %v", name, a, b))
		}
	}
	add("history", have.History, want.History)
	add("ttl", have.TTL, want.TTL)
	add("storage", have.Storage, want.Storage)
	add("replicas", have.Replicas, want.Replicas)
	add("description", have.Description, want.Description)
	return d
}

func joinDiff(d []string) string { return strings.Join(d, ", ") }

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

func isTimeoutOrNoResponders(err error) bool {
	return errors.Is(err, nats.ErrTimeout) || errors.Is(err, nats.ErrNoResponders)
}

// keptAge is the max age setup leaves a stream with: what it wants, unless
// the stream already keeps messages longer (0 is forever). Shortening it
// would delete messages, and setup never deletes data.
func keptAge(have, want time.Duration) time.Duration {
	if have == 0 || want == 0 {
		return 0
	}
	return max(have, want)
}
