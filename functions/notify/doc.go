// Package notify relays imagepipe's result events to people: Slack, Discord,
// a signed generic webhook and email. Every result is logged; which results
// reach which channel is configured per channel, and a ledger keeps a
// redelivered result from being posted twice. A watchdog raises an alert when
// the convert queue holds work that nobody has touched for too long.
package notify
