// Package control is the operator's handle on a running fleet: every
// replica of every function registers a NATS micro service that answers
// status, stats, pause, resume, drain, stop and cancel, and a client
// scatters a request to all of them and gathers the answers. Fleet
// statistics are derived from the results stream, so they survive any
// replica.
package control
