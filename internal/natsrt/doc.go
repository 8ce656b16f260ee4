// Package natsrt binds imagepipe's handlers to durable JetStream pull
// consumers. It owns everything a handler should not know about: fetching
// no more than can run, keeping long jobs alive with InProgress, publishing
// the handler's events with de-duplication ids, and deciding ack, delayed
// nak or term from the class of the handler's error.
package natsrt
