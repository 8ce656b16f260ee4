//go:build linux && !portable

package qemuimg

import (
	"context"
	"errors"
	"strings"
	"testing"
)

func TestInfoFailsUnderTinyAddressSpace(t *testing.T) {
	requireTools(t)
	p := blankImage(t, t.TempDir(), "disk.qcow2", "qcow2", "1M")
	// Each size starves a different stage: the dynamic loader, thread
	// stacks, glibc's allocator.
	for _, as := range []int64{4 * mib, 8 * mib, 16 * mib, 24 * mib} {
		r := New(nil)
		r.Limits.AddressSpace = as
		_, err := r.Info(context.Background(), p, "qcow2")
		var ee *ExitError
		if !errors.As(err, &ee) || !ee.LimitExceeded() {
			t.Errorf("address space %d MiB: err = %v, want an ExitError with LimitExceeded", as/mib, err)
		}
	}
}

func TestRefusesToRunWithoutPrlimit(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	r := New(nil)
	r.Binary = "/usr/bin/qemu-img"
	_, err := r.Info(context.Background(), "/tmp/disk.qcow2", "qcow2")
	if err == nil || !strings.Contains(err.Error(), "util-linux") {
		t.Fatalf("err = %v, want a hint to install util-linux", err)
	}
}
