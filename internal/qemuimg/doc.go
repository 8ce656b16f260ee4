// Package qemuimg runs the qemu-img binary, one child process per call, on
// images that must be treated as hostile. Every call names the image format
// explicitly, refuses paths qemu-img would read as a protocol or JSON
// specification, and runs under address-space and CPU limits in its own
// process group, so a malicious image can neither steer qemu-img to other
// files nor outlive or starve the job that asked for it.
package qemuimg
