package objstore

import (
	"bytes"
	"io"
	"strings"
)

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }

// normalizeMetaKey turns "X-Amz-Meta-Imagepipe-Format" into
// "imagepipe-format" so callers need not care how the server spelled it.
func normalizeMetaKey(k string) string {
	k = strings.ToLower(k)
	return strings.TrimPrefix(k, "x-amz-meta-")
}
