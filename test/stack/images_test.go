package stack_test

import (
	"context"
	"os"
	"testing"

	"github.com/imagepipe/imagepipe/internal/inspect"
	"github.com/imagepipe/imagepipe/test/stack"
)

// The huge image is a few MiB that the inspector, like qemu-img, reads as
// a disk full of data: what convert counts against its scratch space.
func TestHugeImageIsSmallButAllData(t *testing.T) {
	const virtual = 64 << 30
	img, err := stack.Make(context.Background(), t.TempDir(), "huge", stack.Spec{Kind: stack.KindHuge, Virtual: virtual}, false)
	if err != nil {
		t.Fatal(err)
	}
	if img.Size > 32<<20 || img.Fail == nil {
		t.Fatalf("image of %d bytes, failure expected %+v; want a few MiB that must fail", img.Size, img.Fail)
	}
	rep, err := inspect.InspectFile(img.Path, inspect.Limits{})
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(img.Path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if n, ok := inspect.StoredData(rep, f); !ok || n != virtual {
		t.Errorf("stored data %d (known %v), want all %d bytes", n, ok, int64(virtual))
	}
}
