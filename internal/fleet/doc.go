// Package fleet derives the fleet's statistics from the results stream:
// how many uploads were converted, found to be duplicates, failed, retried
// or cancelled, how long conversions took and how many bytes went through.
// The stream is the record, so the numbers survive any replica and need
// none running.
package fleet
