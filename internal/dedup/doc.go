// Package dedup remembers which content imagepipe has already converted, so
// that the same image uploaded under a second name is copied from the
// earlier output instead of converted again. Records live in the JetStream
// key-value bucket imagepipe_dedup, one per content and output format.
package dedup
