// Package convert turns one queued upload into an image: download to a
// per-job scratch directory, inspect it as hostile, convert it with
// qemu-img, verify the output, upload it and report the result. Each stage
// returns an error that names its phase and says whether a retry can help.
package convert
