// Package inspect decides what an uploaded disk image is, in pure Go, before
// any qemu-img process sees it, and refuses images that would make qemu-img
// reach outside the file: backing files, external data files, VMDK extents,
// differencing disks, polyglots and absurd sizes. It also checks what
// qemu-img info later reports against that verdict.
package inspect
