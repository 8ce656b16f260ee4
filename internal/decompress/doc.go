// Package decompress turns an upload, compressed with gzip, xz or zstd or
// not at all, into a file on scratch, and is the one place that decides
// what a compressed upload may cost.
//
// A few MiB of zstd or xz can claim terabytes once expanded. Expand
// recognises the codec by its magic number, bounds the decoder's memory
// (its window or dictionary), and bounds what the expansion may write: the
// content may not exceed the virtual-size limit, counting every byte, and
// the bytes that reach the disk may not exceed the free scratch space
// beyond a reserve, measured again as they are written. Blocks of zeros
// are left as holes, so a stream of zeros costs no disk at all. convert's
// download and `imagepipe inspect` both expand through here, so they
// refuse the same uploads by the same rules.
package decompress
