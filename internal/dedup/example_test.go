package dedup_test

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/internal/dedup"
)

// A converter looks the content up before converting, copies the earlier
// output when there is one, and records its own output after converting.
func Example() {
	ctx := context.Background()
	nc, err := nats.Connect(nats.DefaultURL)
	if err != nil {
		panic(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	store, err := dedup.Open(ctx, js, 90*24*time.Hour)
	if err != nil {
		panic(err)
	}

	content := dedup.ContentKey("8b945bef478408cf6744e493a0454030-2", 25165824)
	if rec, found, err := store.Lookup(ctx, content, "raw"); err == nil && found {
		fmt.Println("copy", rec.Output(), "instead of converting")
		return
	}
	// ... convert and upload images/disks/win11.vhdx.raw, then:
	err = store.Put(ctx, content, "raw", dedup.Record{
		OutputBucket: "images", OutputKey: "disks/win11.vhdx.raw", SHA256: "9f86d0…", Size: 68719476736,
		JobID: "1b7c0f0e-3f7a-5a43-9d0e-6f1c2b9b5a10", InputBucket: "uploads", InputKey: "disks/win11.vhdx",
	})
	if err != nil {
		fmt.Println("not recorded; the next upload of this content is converted again:", err)
	}
}

func ExampleContentKey() {
	fmt.Println(dedup.ContentKey(`"8b945bef478408cf6744e493a0454030-2"`, 25165824))
	fmt.Println(dedup.ContentKeySHA256("9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"))
	// Output:
	// etag_8b945bef478408cf6744e493a0454030-2_25165824
	// sha256_9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
}
