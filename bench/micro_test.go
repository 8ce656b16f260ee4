package bench

import (
	"context"
	"os/exec"
	"testing"
)

func BenchmarkInspect(b *testing.B) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		b.Fatal("qemu-img is needed to build the images: run go tool task deps")
	}
	fixtures, err := InspectFixtures(context.Background(), b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	for _, f := range fixtures {
		b.Run(f.Kind, Inspect(f.Data))
	}
}

func BenchmarkParseNotification(b *testing.B) { ParseNotification(b) }

func BenchmarkParseProgress(b *testing.B) { ParseProgress(b) }
