package nbd

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// qemu runs a qemu-utils binary in dir and returns its combined output,
// failing the test if it cannot be found or exits non-zero.
func qemu(t *testing.T, dir, name string, args ...string) string {
	t.Helper()
	bin, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is required (Debian qemu-utils): %v", name, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// nbdTarget is the image-opts string convert gives qemu-img for sock.
func nbdTarget(sock string) string {
	return "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=" + sock
}

func TestQemuImgConvertWritesEveryByteInOrder(t *testing.T) {
	const size = 64 << 20
	dir := t.TempDir()
	qemu(t, dir, "qemu-img", "create", "-f", "vhdx", "in.vhdx", "64M")
	qemu(t, dir, "qemu-io", "-f", "vhdx", "-c", "write -P 0xab 0 1M", "-c", "write -P 0xcd 40M 3M", "in.vhdx")
	qemu(t, dir, "qemu-img", "convert", "-f", "vhdx", "-O", "raw", "in.vhdx", "ref.raw")
	want, err := os.ReadFile(filepath.Join(dir, "ref.raw"))
	if err != nil {
		t.Fatal(err)
	}
	if len(want) != size {
		t.Fatalf("ref.raw is %d bytes, want %d", len(want), size)
	}

	dev := newMemDevice(size)
	srv := start(t, &Server{Size: size, Device: dev})
	// The form convert uses; "--" keeps a source named like an option from
	// being read as one, and qemu-img accepts it with --target-image-opts.
	qemu(t, dir, "qemu-img", "convert", "-n", "--target-is-zero", "-f", "vhdx",
		"--target-image-opts", "--", "in.vhdx", nbdTarget(srv.sock))

	got, calls := dev.snapshot()
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && got[i] == want[i] {
			i++
		}
		t.Fatalf("device differs from qemu-img's raw output, first at byte %d", i)
	}
	var written int64
	for i, c := range calls {
		if c.op != "write" {
			t.Errorf("call %d: %+v, want only writes", i, c)
			continue
		}
		if !c.aligned {
			t.Errorf("call %d: write payload at %d not page aligned", i, c.off)
		}
		if i > 0 && calls[i-1].off+calls[i-1].n > c.off {
			t.Errorf("call %d: write [%d, %d) does not follow [%d, %d)", i,
				c.off, c.off+c.n, calls[i-1].off, calls[i-1].off+calls[i-1].n)
		}
		written += c.n
	}
	// --target-is-zero lets qemu-img skip the zeros: only the 4 MiB of
	// pattern should have crossed the socket.
	if written != 4<<20 {
		t.Errorf("%d bytes written in %d calls, want %d", written, len(calls), 4<<20)
	}
	t.Logf("qemu-img convert made %d calls: %+v", len(calls), calls)
}

func TestQemuIOWritesZeroesDiscardsAndReadsBack(t *testing.T) {
	const size = 1 << 20
	dev := newMemDevice(size)
	// Non-zero where qemu-io zeroes and discards, so both must reach Zero.
	for _, off := range []int{65536, 131072} {
		copy(dev.data[off:off+4096], bytes.Repeat([]byte{0xff}, 4096))
	}
	srv := start(t, &Server{Size: size, Device: dev})

	out := qemu(t, t.TempDir(), "qemu-io", "--image-opts", nbdTarget(srv.sock),
		"-c", "write -P 0x5a 4096 8192",
		"-c", "write -z 65536 4096",
		"-c", "discard 131072 4096",
		"-c", "flush",
		"-c", "read -P 0x5a 4096 8192")
	for _, line := range []string{
		"wrote 8192/8192 bytes at offset 4096",
		"wrote 4096/4096 bytes at offset 65536",
		"discard 4096/4096 bytes at offset 131072",
		"read 8192/8192 bytes at offset 4096",
	} {
		if !strings.Contains(out, line) {
			t.Errorf("qemu-io output lacks %q:\n%s", line, out)
		}
	}
	if strings.Contains(out, "Pattern verification failed") {
		t.Errorf("qemu-io read back other bytes than it wrote:\n%s", out)
	}

	got, calls := dev.snapshot()
	wantCalls := []call{
		{"write", 4096, 8192, true},
		{op: "zero", off: 65536, n: 4096},
		{op: "zero", off: 131072, n: 4096},
		{"read", 4096, 8192, true},
	}
	if !slices.Equal(calls, wantCalls) {
		t.Errorf("device calls:\n got %+v\nwant %+v", calls, wantCalls)
	}
	want := make([]byte, size)
	copy(want[4096:4096+8192], bytes.Repeat([]byte{0x5a}, 8192))
	if !bytes.Equal(got, want) {
		t.Error("device holds other bytes than qemu-io's writes, zeroes and discard leave")
	}
}
