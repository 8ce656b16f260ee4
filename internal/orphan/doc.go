// Package orphan finds the uploads that wait for a job nothing will run:
// a status in a non-final state, standing still for longer than a live job
// ever does, whose job the convert queue no longer holds. The queue cannot
// show them (it is empty of their jobs), so they are judged here, once, for
// everyone who needs to know: reconcile queues their jobs again, and the
// stall watchdog, `imagepipe ctl stats` and the metrics count them.
package orphan
