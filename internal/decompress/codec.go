package decompress

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/therootcompany/xz"
)

// Codec is the compression of an upload, recognised by its magic number,
// never by its name.
type Codec string

// The codecs Expand decompresses. None is an upload stored as it is.
const (
	None Codec = ""
	Gzip Codec = "gzip"
	XZ   Codec = "xz"
	Zstd Codec = "zstd"
)

// HeadLen is how many leading bytes Detect needs to see.
const HeadLen = 6

var magics = []struct {
	codec Codec
	magic []byte
}{
	{Gzip, []byte{0x1f, 0x8b}},
	{XZ, []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}},
	{Zstd, []byte{0x28, 0xb5, 0x2f, 0xfd}},
}

// Detect names the codec whose magic number starts head, or None.
func Detect(head []byte) Codec {
	for _, m := range magics {
		if bytes.HasPrefix(head, m.magic) {
			return m.codec
		}
	}
	return None
}

// MaxWindow bounds the memory a compressed upload may make the decoder
// hold: the xz dictionary or zstd window its header declares. A header is
// free to claim gigabytes; 64 MiB covers xz -9 and zstd up to --ultra -21,
// and keeps a replica's memory flat.
const MaxWindow = 64 << 20

// NewReader returns a reader of br's content, decompressed if it starts
// with a known magic number, and the codec it found. A header asking for
// more than MaxWindow is refused with rule decompress-window.
func NewReader(br *bufio.Reader) (io.ReadCloser, Codec, error) {
	r, codec, err := newReader(br)
	var de *decodeErr
	if errors.As(err, &de) {
		err = decodeError(codec, de.err)
	}
	return r, codec, err
}

// newReader is NewReader leaving a failure to open the stream undecided:
// Expand first rules out its source.
func newReader(br *bufio.Reader) (io.ReadCloser, Codec, error) {
	head, _ := br.Peek(HeadLen)
	codec := Detect(head)
	var (
		r   io.ReadCloser
		err error
	)
	switch codec {
	case None:
		return io.NopCloser(br), None, nil
	case Gzip:
		r, err = gzip.NewReader(br)
	case XZ:
		var xr *xz.Reader
		if xr, err = xz.NewReader(br, MaxWindow); err == nil {
			r = io.NopCloser(xr)
		}
	case Zstd:
		var zr *zstd.Decoder
		if zr, err = zstd.NewReader(br, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
			zstd.WithDecoderMaxWindow(MaxWindow), zstd.WithDecoderMaxMemory(MaxWindow)); err == nil {
			r = zr.IOReadCloser()
		}
	}
	if err != nil {
		return nil, codec, &decodeErr{codec, fmt.Errorf("open %s stream: %w", codec, err)}
	}
	return r, codec, nil
}

// windowTooLarge reports whether a decoder gave up because the stream
// asks for more memory than MaxWindow.
func windowTooLarge(err error) bool {
	return errors.Is(err, xz.ErrMemlimit) || errors.Is(err, zstd.ErrWindowSizeExceeded) || errors.Is(err, zstd.ErrDecoderSizeExceeded)
}

// suffixes are what a key may end in for each codec; the first is the
// usual one.
var suffixes = map[Codec][]string{Gzip: {".gz"}, XZ: {".xz"}, Zstd: {".zst", ".zstd"}}

// KeyForExtension is the key whose extension must agree with the
// decompressed content: disk.qcow2.xz names a qcow2. The codec's suffix
// is stripped, in any case, only when the content was compressed with it.
func KeyForExtension(key string, c Codec) string {
	lower := strings.ToLower(key)
	for _, sfx := range suffixes[c] {
		if strings.HasSuffix(lower, sfx) {
			return key[:len(key)-len(sfx)]
		}
	}
	return key
}
