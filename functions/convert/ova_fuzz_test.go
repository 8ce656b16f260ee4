package convert

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/inspect"
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
func (noQemu) Convert(context.Context, string, string, string, string, func(float64)) error {
	return errNoQemu
}
func (noQemu) ConvertToNBD(context.Context, string, string, string, func(float64)) error {
	return errNoQemu
}
func (noQemu) Version(context.Context) (string, error) { return "", errNoQemu }

type ovaMember struct {
	name string
	body []byte
	typ  byte
}

func ovaBytes(tb testing.TB, members ...ovaMember) []byte {
	tb.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, m := range members {
		typ := m.typ
		if typ == 0 {
			typ = tar.TypeReg
		}
		hdr := &tar.Header{Name: m.name, Mode: 0o644, Size: int64(len(m.body)), Typeflag: typ}
		if typ != tar.TypeReg {
			hdr.Size, hdr.Linkname = 0, "/etc/passwd"
		}
		if err := tw.WriteHeader(hdr); err != nil {
			tb.Fatal(err)
		}
		if _, err := tw.Write(m.body); err != nil && typ == tar.TypeReg {
			tb.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

const fuzzOVF = `<?xml version="1.0"?><Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"/>`

func manifestFor(name string, body []byte) []byte {
	sum := sha256.Sum256(body)
	return fmt.Appendf(nil, "SHA256(%s)= %s\n", name, hex.EncodeToString(sum[:]))
}

// ovaSeeds are archives that get past the magic numbers and the manifest
// in different ways: good ones, a tampered manifest, members that escape or
// link, and (when qemu-img is installed) real VMDK disks.
func ovaSeeds(tb testing.TB) [][]byte {
	raw := bytes.Repeat([]byte{0x5a}, 4096)
	seeds := [][]byte{
		ovaBytes(tb, ovaMember{name: "a.ovf", body: []byte(fuzzOVF)}, ovaMember{name: "a.mf", body: manifestFor("disk.img", raw)}, ovaMember{name: "disk.img", body: raw}),
		ovaBytes(tb, ovaMember{name: "a.ovf", body: []byte(fuzzOVF)}, ovaMember{name: "disk.img", body: raw}, ovaMember{name: "a.mf", body: []byte("SHA1(disk.img)= 00\n")}),
		ovaBytes(tb, ovaMember{name: "a.ovf", body: []byte(fuzzOVF)}, ovaMember{name: "../../disk.img", body: raw}),
		ovaBytes(tb, ovaMember{name: "a.ovf", body: []byte(fuzzOVF)}, ovaMember{name: "disk.vmdk", typ: tar.TypeSymlink}),
		ovaBytes(tb, ovaMember{name: "a.ovf", body: []byte(fuzzOVF)}, ovaMember{name: "a.mf", body: []byte("not a manifest")}),
		ovaBytes(tb, ovaMember{name: "a.ovf", body: []byte(fuzzOVF)}),
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
		seeds = append(seeds, ovaBytes(tb,
			ovaMember{name: "web.ovf", body: []byte(fuzzOVF)},
			ovaMember{name: "web.mf", body: manifestFor("web-disk1.vmdk", body)},
			ovaMember{name: "web-disk1.vmdk", body: body},
			ovaMember{name: "web-disk2.vmdk", body: body}))
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
		h := New(Config{OutputBucket: "images", OutputFormat: "raw", ScratchDir: root, MaxVirtualSize: 1 << 40,
			ConvertTimeoutBase: time.Minute, ConvertTimeoutPerGiB: time.Minute}, nil, noQemu{}, nil, nil, log)
		j := &job{ConvertJob: events.ConvertJob{JobID: "fuzz", Bucket: "uploads", Key: "apps/web.ova"},
			dir: jobDir, input: input, outFormat: "raw", log: log}

		// As in a job: only what the inspector accepts as an OVA is read
		// as one.
		rep, err := inspect.InspectFile(input, h.limits())
		if err != nil || rep.Format != inspect.OVA {
			return
		}
		err = h.convertOVA(context.Background(), j)

		// qemu-img is never reached here, so no OVA can succeed.
		if err == nil {
			t.Fatalf("an OVA converted without qemu-img: %d disk(s)", len(j.disks))
		}
		if !errors.Is(err, errNoQemu) {
			fe, ok := failure.As(err)
			if !ok || fe.Phase != events.PhaseInspect || fe.Err == nil {
				t.Fatalf("OVA error is not an inspect-phase failure: %#v", err)
			}
			if fe.Rule != "" && !failure.IsPermanent(err) {
				t.Fatalf("a refusal (rule %s) would be retried: %v", fe.Rule, err)
			}
		}
		for _, d := range j.disks {
			if !strings.HasPrefix(d.outKey, j.Key+"/") || strings.Contains("/"+d.outKey+"/", "/../") {
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

var manifestValue = regexp.MustCompile(`^(sha1|sha256):[0-9a-f]+$`)

func FuzzParseManifest(f *testing.F) {
	f.Add("SHA256(disk1.vmdk)= " + strings.Repeat("ab", 32) + "\n")
	f.Add("SHA1 (a.ovf) = 0123456789abcdef0123456789abcdef01234567\r\n\nSHA256(b)=FF\n")
	f.Add("SHA512(a)= 00\n")
	f.Add("SHA256((a))= 00")
	f.Add(strings.Repeat("x", 70000))
	f.Fuzz(func(t *testing.T, text string) {
		m := map[string]string{}
		if err := parseManifest(strings.NewReader(text), m); err != nil {
			return
		}
		for name, v := range m {
			if name == "" || strings.Contains(name, ")") {
				t.Fatalf("manifest entry with name %q", name)
			}
			if !manifestValue.MatchString(v) {
				t.Fatalf("manifest entry %q = %q", name, v)
			}
		}
	})
}
