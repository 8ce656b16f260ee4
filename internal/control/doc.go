// Package control is the control plane: every request an operator sends to
// a running fleet, served and asked in one way (endpoint.go), as nats.go's
// micro services answer. Each replica of every function answers the
// replica verbs (status, stats, pause, resume, drain, stop, cancel) for
// itself, and a client scatters a verb to all of them and gathers the
// answers; ingest's replicas answer reconvert, import and reconcile, one
// replica per request. The wire types and subjects are in events.
package control
