package convert

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/inspect"
	"github.com/imagepipe/imagepipe/internal/inspect/ovatest"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
)

// errNoQemu stands in for qemu-img: the OVA reader is fuzzed up to the
// point where a disk that passed every check in Go would be handed to it.
var errNoQemu = errors.New("qemu-img is not run while fuzzing")

type noQemu struct{}

var _ QemuImg = noQemu{}

func (noQemu) Info(context.Context, string, string) (qemuimg.InfoResult, error) {
	return qemuimg.InfoResult{}, errNoQemu
}
func (noQemu) Measure(context.Context, string, string) (int64, error) { return 0, errNoQemu }
func (noQemu) Convert(context.Context, string, string, string, string, func(float64)) error {
	return errNoQemu
}
func (noQemu) ConvertToNBD(context.Context, string, string, string, func(float64)) error {
	return errNoQemu
}
func (noQemu) Version(context.Context) (string, error) { return "", errNoQemu }

// ovaSeeds are archives that reach every stage of an OVA job short of
// qemu-img: good appliances with the manifest before or after the disks, a
// tampered manifest, and the hostile members the reader refuses (sparse in
// both forms, symbolic and hard links, duplicates, escaping names) and,
// when qemu-img is installed, real VMDK disks.
func ovaSeeds(tb testing.TB) [][]byte {
	raw := ovatest.Member{Name: "disk.img", Body: bytes.Repeat([]byte{0x5a}, 4096)}
	desc := func(files ...ovatest.Member) ovatest.Member {
		return ovatest.Member{Name: "a.ovf", Body: ovatest.OVF(files...)}
	}
	mf := func(files ...ovatest.Member) ovatest.Member {
		return ovatest.Member{Name: "a.mf", Body: ovatest.Manifest(files, nil)}
	}
	seeds := [][]byte{
		ovatest.Build(tb, desc(raw), mf(raw), raw),
		ovatest.Appliance(tb, []ovatest.Member{raw}, map[string]string{"disk.img": strings.Repeat("0", 64)}),
		ovatest.Build(tb, desc(raw), ovatest.Member{Name: "../../disk.img", Body: raw.Body}),
		ovatest.Build(tb, desc(raw), ovatest.Member{Name: "disk.img", Type: tar.TypeSymlink, Link: "/etc/passwd"}),
		ovatest.Build(tb, desc(raw), ovatest.Member{Name: "disk.img", Type: tar.TypeLink, Link: "a.ovf"}),
		ovatest.Build(tb, desc(raw), ovatest.Member{Name: "disk.img", Sparse: 1 << 50, SparseForm: ovatest.SparseGNU}),
		ovatest.Build(tb, desc(raw), ovatest.Member{Name: "disk.img", Sparse: 1 << 50, SparseForm: ovatest.SparsePAX}),
		ovatest.Build(tb, desc(raw), raw, ovatest.Member{Name: "disk.img", Body: []byte("second")}),
		ovatest.Build(tb, desc(raw), raw, ovatest.Member{Name: "a.mf", Body: []byte("not a manifest")}),
		ovatest.Build(tb, desc()),
	}
	if _, err := exec.LookPath("qemu-img"); err != nil {
		return seeds
	}
	dir := tb.TempDir()
	for _, sub := range []string{"monolithicSparse", "streamOptimized"} {
		p := filepath.Join(dir, sub+".vmdk")
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat="+sub, p, "1M").CombinedOutput(); err != nil {
			tb.Fatalf("qemu-img create: %v\n%s", err, out)
		}
		body, err := os.ReadFile(p)
		if err != nil {
			tb.Fatal(err)
		}
		seeds = append(seeds, ovatest.Appliance(tb, []ovatest.Member{
			{Name: "web-disk1.vmdk", Body: body}, {Name: "web-disk2.vmdk", Body: body}}, nil))
	}
	return seeds
}

func FuzzConvertOVA(f *testing.F) {
	for _, s := range ovaSeeds(f) {
		f.Add(s)
	}
	log := slog.New(slog.DiscardHandler)
	f.Fuzz(func(t *testing.T, data []byte) {
		root := t.TempDir()
		jobDir := filepath.Join(root, "job")
		if err := os.Mkdir(jobDir, 0o700); err != nil {
			t.Fatal(err)
		}
		input := filepath.Join(jobDir, "input")
		if err := os.WriteFile(input, data, 0o600); err != nil {
			t.Fatal(err)
		}
		h := New(Config{OutputBucket: "images", OutputPrefix: "out/", OutputFormat: "raw", ScratchDir: root, MaxVirtualSize: 1 << 40,
			ConvertTimeoutBase: time.Minute, ConvertTimeoutPerGiB: time.Minute, OVAMaxMembers: 16, OVAMaxDisks: 4}, nil, noQemu{}, nil, nil, log)
		j := h.newJob(events.ConvertJob{JobID: "fuzz", Bucket: "uploads", Key: "apps/web.ova"}, 1, 1)
		j.dir, j.outFormat = jobDir, "raw"

		// As in a job: only what the inspector accepts as an OVA is read
		// as one.
		rep, err := inspect.InspectFile(input, h.limits())
		if err != nil || rep.Format != inspect.OVA {
			return
		}
		disks, err := h.convertOVA(context.Background(), j, h.track(j, inspect.OVA), downloaded{path: input})

		// qemu-img is never reached here, so no OVA can succeed.
		if err == nil {
			t.Fatalf("an OVA converted without qemu-img: %d disk(s)", len(disks))
		}
		fe, ok := failure.As(err)
		if !ok || fe.Phase != events.PhaseInspect || fe.Err == nil {
			t.Fatalf("OVA error is not an inspect-phase failure: %#v", err)
		}
		if fe.Rule != "" && !failure.IsPermanent(err) {
			t.Fatalf("a refusal (rule %s) would be retried: %v", fe.Rule, err)
		}
		// An archive holding what an OVA never holds is refused whole,
		// and nothing of it is extracted.
		if why := hostileMember(data); why != "" {
			if fe.Rule == "" || !fe.Permanent {
				t.Fatalf("an archive with %s got past the reader: %v", why, err)
			}
		}
		// An archive the first pass or the manifest refuses is refused by
		// that rule, before any of it is extracted.
		arc, rerr := inspect.ReadOVA(bytes.NewReader(data), int64(len(data)), h.limits())
		if rerr == nil {
			rerr = arc.CheckManifest(context.Background(), bytes.NewReader(data))
		}
		var ref *inspect.Refusal
		if errors.As(rerr, &ref) {
			if fe.Rule != ref.Rule {
				t.Fatalf("the reader refuses by rule %s, the job failed with %v", ref.Rule, err)
			}
			if entries, _ := os.ReadDir(jobDir); len(entries) != 1 {
				t.Fatalf("an archive refused by rule %s left %d files in scratch", ref.Rule, len(entries))
			}
		}
		for _, d := range disks {
			if inspect.CheckName("member name", d.member) != nil || strings.ContainsAny(d.member, `/\`) {
				t.Fatalf("disk member name %q accepted", d.member)
			}
			if d.outKey != events.OVADiskKey("out/", j.Key, d.member, "raw") || !events.HasReservedSegment(d.outKey) {
				t.Fatalf("disk %q of the OVA would be written to %q", d.member, d.outKey)
			}
			if filepath.Dir(d.input) != jobDir || filepath.Dir(d.output) != jobDir {
				t.Fatalf("disk %q extracted outside the job's scratch dir: %s, %s", d.member, d.input, d.output)
			}
		}
		// Nothing lands beside the job's own dir, whatever the member names.
		entries, err := os.ReadDir(root)
		if err != nil {
			t.Fatal(err)
		}
		if len(entries) != 1 {
			t.Fatalf("scratch root holds %d entries after the OVA was read", len(entries))
		}
	})
}

// hostileMember names the first member archive/tar finds in data that an
// OVA never holds (sparse, a link, a device, a second member of one name),
// or "".
func hostileMember(data []byte) string {
	tr := tar.NewReader(bytes.NewReader(data))
	seen := map[string]bool{}
	for {
		h, err := tr.Next()
		if err != nil {
			return ""
		}
		switch {
		case h.Typeflag == tar.TypeGNUSparse:
			return "a GNU sparse member"
		case h.Typeflag == tar.TypeLink || h.Typeflag == tar.TypeSymlink:
			return "a link"
		case h.Typeflag == tar.TypeChar || h.Typeflag == tar.TypeBlock || h.Typeflag == tar.TypeFifo:
			return "a device"
		case h.Typeflag == tar.TypeReg && seen[h.Name]:
			return "a duplicate member"
		}
		for k := range h.PAXRecords {
			if strings.HasPrefix(k, "GNU.sparse.") {
				return "a PAX sparse member"
			}
		}
		seen[h.Name] = true
	}
}
