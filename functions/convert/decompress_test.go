package convert

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"io"
	"testing"

	"github.com/klauspost/compress/zstd"
	ulxz "github.com/ulikunitz/xz"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
)

// payload is more than the window cap, so a decoder that kept all of it
// would show; it compresses well, so the test stays fast.
func payload() []byte {
	b := make([]byte, 96<<20)
	for i := 0; i < len(b); i += 4096 {
		b[i] = byte(i >> 12)
	}
	return b
}

// compressed runs data through the writer newWriter makes.
func compressed(t *testing.T, data []byte, newWriter func(io.Writer) (io.WriteCloser, error)) []byte {
	t.Helper()
	var buf bytes.Buffer
	w, err := newWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func xzWithDict(dictCap int) func(io.Writer) (io.WriteCloser, error) {
	return func(w io.Writer) (io.WriteCloser, error) { return ulxz.WriterConfig{DictCap: dictCap}.NewWriter(w) }
}

// zstdFrameDeclaringWindow is a valid zstd frame whose header asks for a
// window of 2^n bytes and whose one raw block holds a few bytes: encoders
// shrink the window to fit small inputs, so a hostile header is written
// by hand (RFC 8878, section 3.1.1).
func zstdFrameDeclaringWindow(window uint64) []byte {
	log := 0
	for uint64(1)<<log < window {
		log++
	}
	frame := []byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, byte(log-10) << 3}
	block := []byte("imagepipe")
	size := len(block)<<3 | 1 // last block, raw
	frame = append(frame, byte(size), byte(size>>8), byte(size>>16))
	return append(frame, block...)
}

func TestCompressedStreamsWithinTheWindowCapDecodeWhole(t *testing.T) {
	data := payload()
	want := sha256.Sum256(data)
	for name, body := range map[string][]byte{
		"xz -9 (64 MiB dictionary)": compressed(t, data, xzWithDict(64<<20)),
		"zstd 8 MiB window": compressed(t, data, func(w io.Writer) (io.WriteCloser, error) {
			return zstd.NewWriter(w, zstd.WithWindowSize(8<<20))
		}),
	} {
		t.Run(name, func(t *testing.T) {
			r, _, err := decompressor(bufio.NewReader(bytes.NewReader(body)))
			if err != nil {
				t.Fatal(err)
			}
			h := sha256.New()
			if _, err := io.Copy(h, r); err != nil {
				t.Fatalf("decode: %v", err)
			}
			if got := h.Sum(nil); !bytes.Equal(got, want[:]) {
				t.Fatal("decoded bytes differ from the original")
			}
		})
	}
}

func TestCompressedUploadDeclaringAHugeWindowIsRefusedByRule(t *testing.T) {
	data := bytes.Repeat([]byte("imagepipe"), 1000)
	for key, body := range map[string][]byte{
		"big-dict.qcow2.xz":    compressed(t, data, xzWithDict(1<<30)),
		"big-window.qcow2.zst": zstdFrameDeclaringWindow(256 << 20),
	} {
		t.Run(key, func(t *testing.T) {
			store, calls := memStore(key, body, nil)
			rep := &fakeReporter{}
			h := newTestHandler(t, store, rep)
			out, err := h.Handle(context.Background(), events.ConvertJob{JobID: "j", Bucket: "uploads", Key: key, ETag: "e1", Size: int64(len(body))}, 1, 4)
			if !failure.IsPermanent(err) {
				t.Fatalf("err = %v, want a permanent refusal", err)
			}
			var f events.Failed
			if err := out[0].Event.DecodeData(events.TypeFailed, &f); err != nil {
				t.Fatal(err)
			}
			if f.Rule != "decompress-window" || f.Phase != events.PhaseDownload || f.WillRetry || f.Suggestion == "" {
				t.Errorf("failed = %+v, want rule decompress-window in download, not retried, with a suggestion", f)
			}
			for _, c := range *calls {
				if len(c) > 7 && c[:7] == "upload " {
					t.Errorf("an output was uploaded: %v", *calls)
				}
			}
		})
	}
}
