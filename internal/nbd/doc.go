// Package nbd is a minimal NBD server for one local client: qemu-img.
//
// convert runs `qemu-img convert -n --target-is-zero ... --target-image-opts
// driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=SOCK`,
// so qemu-img writes its raw output into this server instead of a file. The
// server hands every write to a Device, which lets the caller hash and upload
// the output while qemu-img is still writing it. The socket lives in the
// job's private scratch directory, so the server speaks only what qemu-img
// needs: fixed newstyle negotiation, simple replies, no TLS, one export.
package nbd
