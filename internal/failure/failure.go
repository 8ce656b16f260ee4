// Package failure classifies job errors as permanent or retryable, at the
// place where that is known, and carries the phase and a suggestion for the
// person who will read the failure event.
package failure

import (
	"errors"
	"fmt"

	"github.com/imagepipe/imagepipe/events"
)

// ErrCancelled is the cancellation cause of a job stopped by an operator,
// as opposed to a shutdown, after which the job runs again elsewhere.
var ErrCancelled = errors.New("cancelled by an operator")

// Error is a job failure with its class. The runtime terminates a message
// whose error is permanent and redelivers it with back-off otherwise.
type Error struct {
	Phase      events.Phase
	Permanent  bool
	Rule       string // the safety or intake rule that refused the input, if any
	Suggestion string
	Err        error
}

func (e *Error) Error() string { return fmt.Sprintf("%s: %v", e.Phase, e.Err) }
func (e *Error) Unwrap() error { return e.Err }

// Permanent marks err as one no retry can fix: corrupt or hostile input,
// unsupported format, permission denied.
func Permanent(phase events.Phase, err error, suggestion string) *Error {
	return &Error{Phase: phase, Permanent: true, Suggestion: suggestion, Err: err}
}

// Retryable marks err as transient: storage or NATS unreachable, timeouts,
// scratch space full.
func Retryable(phase events.Phase, err error, suggestion string) *Error {
	return &Error{Phase: phase, Suggestion: suggestion, Err: err}
}

// Refused is a permanent failure that names the rule that refused the input.
func Refused(phase events.Phase, rule string, err error, suggestion string) *Error {
	return &Error{Phase: phase, Permanent: true, Rule: rule, Suggestion: suggestion, Err: err}
}

// IsPermanent reports whether err, anywhere in its chain, is a permanent
// failure. Unclassified errors are treated as retryable: the consumer's
// max-deliver bounds the cost of being wrong.
func IsPermanent(err error) bool {
	var fe *Error
	return errors.As(err, &fe) && fe.Permanent
}

// As returns the classified failure in err's chain, if any.
func As(err error) (*Error, bool) {
	var fe *Error
	ok := errors.As(err, &fe)
	return fe, ok
}

// WillRetry reports whether a message that failed with err on attempt
// (1-based) of max will be delivered again. The runtime decides with it and
// handlers use it to say so in their failure events, so the two agree.
func WillRetry(err error, attempt, max int) bool {
	return err != nil && !IsPermanent(err) && attempt < max
}
