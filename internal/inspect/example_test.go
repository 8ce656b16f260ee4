package inspect_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"

	"github.com/imagepipe/imagepipe/internal/inspect"
)

func ExampleInspect() {
	// The first cluster of a qcow2 v3 image of a 1 GiB disk.
	img := make([]byte, 64<<10)
	be := binary.BigEndian
	copy(img, "QFI\xfb")
	be.PutUint32(img[4:], 3)      // version
	be.PutUint32(img[20:], 16)    // 64 KiB clusters
	be.PutUint64(img[24:], 1<<30) // virtual size
	be.PutUint32(img[36:], 2)     // L1 entries
	be.PutUint32(img[96:], 4)     // 16-bit refcounts
	be.PutUint32(img[100:], 104)  // header length

	rep, err := inspect.Inspect(bytes.NewReader(img), int64(len(img)), inspect.Limits{MaxVirtualSize: 64 << 30})
	fmt.Println(rep.Format, rep.VirtualSize, rep.Details, err)

	// The same image, now naming a backing file that qemu-img would open.
	be.PutUint64(img[8:], 0x1000)
	be.PutUint32(img[16:], 11)
	copy(img[0x1000:], "/etc/shadow")
	_, err = inspect.Inspect(bytes.NewReader(img), int64(len(img)), inspect.Limits{MaxVirtualSize: 64 << 30})
	var ref *inspect.Refusal
	if errors.As(err, &ref) {
		fmt.Println(ref.Rule)
		fmt.Println(ref.Suggestion)
	}
	// Output:
	// qcow2 1073741824 [qcow2 v3 cluster size 65536] <nil>
	// backing-file
	// flatten the image where its whole chain is available, e.g. qemu-img convert -O qcow2 top.qcow2 standalone.qcow2, and upload the result
}
