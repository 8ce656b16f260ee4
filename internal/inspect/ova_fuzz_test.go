package inspect

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"encoding/hex"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/imagepipe/imagepipe/internal/inspect/ovatest"
)

// ovaFuzzSeeds are archives that reach every rule of the OVA reader: good
// appliances, sparse members (GNU and PAX), links (symbolic and hard),
// devices, duplicate and hostile names, undeclared members and manifests
// good and bad.
func ovaFuzzSeeds(tb testing.TB) [][]byte {
	d := ovatest.Member{Name: "disk.vmdk", Body: bytes.Repeat([]byte{0x5a}, 1024)}
	d2 := ovatest.Member{Name: "disk2.vmdk", Body: bytes.Repeat([]byte{0xa5}, 600)}
	desc := func(files ...ovatest.Member) ovatest.Member {
		return ovatest.Member{Name: "app.ovf", Body: ovatest.OVF(files...)}
	}
	return [][]byte{
		ovatest.Appliance(tb, []ovatest.Member{d, d2}, nil),
		ovatest.Appliance(tb, []ovatest.Member{d, d2}, map[string]string{"disk2.vmdk": strings.Repeat("0", 64)}),
		ovatest.Build(tb, desc(d), ovatest.Member{Name: "app.mf", Body: ovatest.Manifest([]ovatest.Member{d}, nil)}, d),
		ovatest.Build(tb, desc(d), ovatest.Member{Name: "disk.vmdk", Sparse: 1 << 50, SparseForm: ovatest.SparseGNU}),
		ovatest.Build(tb, desc(d), ovatest.Member{Name: "disk.vmdk", Sparse: 1 << 50, SparseForm: ovatest.SparsePAX}),
		ovatest.Build(tb, desc(d, d2), d, ovatest.Member{Name: "disk2.vmdk", Type: tar.TypeSymlink, Link: "/etc/passwd"}),
		ovatest.Build(tb, desc(d, d2), d, ovatest.Member{Name: "disk2.vmdk", Type: tar.TypeLink, Link: "disk.vmdk"}),
		ovatest.Build(tb, desc(d, d2), d, ovatest.Member{Name: "disk2.vmdk", Type: tar.TypeChar}),
		ovatest.Build(tb, desc(d), d, ovatest.Member{Name: "disk.vmdk", Body: d2.Body}),
		ovatest.Build(tb, desc(d), d, ovatest.Member{Name: "../disk.vmdk", Body: d2.Body}),
		ovatest.Build(tb, desc(d), d, ovatest.Member{Name: "disk\u202e.vmdk", Body: d2.Body}),
		ovatest.Build(tb, desc(d), d, ovatest.Member{Name: "extra.bin", Body: d2.Body}),
	}
}

func FuzzReadOVA(f *testing.F) {
	for _, s := range ovaFuzzSeeds(f) {
		f.Add(s)
	}
	lim := Limits{MaxVirtualSize: 1 << 40, MaxOVAMembers: 16, MaxOVADisks: 4}
	f.Fuzz(func(t *testing.T, data []byte) {
		size := int64(len(data))
		a, err := ReadOVA(bytes.NewReader(data), size, lim)
		var ref *Refusal
		if err != nil && !errors.As(err, &ref) {
			t.Fatalf("a reader over bytes cannot fail, yet: %v", err)
		}
		// One verdict: what `imagepipe inspect` says of an archive is what
		// convert's reader says.
		if rep, ierr := Inspect(bytes.NewReader(data), size, lim); rep.Format == OVA && ruleOf(ierr) != ruleOf(err) {
			t.Fatalf("Inspect says %v, ReadOVA says %v", ierr, err)
		}
		if err != nil {
			return
		}
		checkAccepted(t, a, data, lim)
		if err := a.CheckManifest(context.Background(), bytes.NewReader(data)); err != nil && !errors.As(err, &ref) {
			t.Fatalf("manifest check failed with no refusal: %v", err)
		}
	})
}

func ruleOf(err error) string {
	var ref *Refusal
	if errors.As(err, &ref) {
		return ref.Rule
	}
	if err != nil {
		return "error"
	}
	return ""
}

// checkAccepted holds an accepted archive to the rules, read again with
// archive/tar as any unpacker would.
func checkAccepted(t *testing.T, a *OVAArchive, data []byte, lim Limits) {
	t.Helper()
	if len(a.Members) > lim.MaxOVAMembers || len(a.Disks) > lim.MaxOVADisks || len(a.Disks) == 0 {
		t.Fatalf("%d members, %d disks accepted", len(a.Members), len(a.Disks))
	}
	byName := map[string]OVAMember{}
	for _, m := range a.Members {
		if err := checkMemberName(m.Name); err != nil {
			t.Fatalf("member name %q accepted: %v", m.Name, err)
		}
		if _, dup := byName[m.Name]; dup {
			t.Fatalf("duplicate member %q accepted", m.Name)
		}
		if m.Offset < 0 || m.Size < 0 || m.Offset+m.Size > int64(len(data)) {
			t.Fatalf("member %q at %d+%d lies outside the %d-byte archive", m.Name, m.Offset, m.Size, len(data))
		}
		byName[m.Name] = m
	}
	for _, d := range a.Disks {
		if byName[d.Name] != d {
			t.Fatalf("disk %+v is not a member", d)
		}
	}
	tr := tar.NewReader(bytes.NewReader(data))
	files := 0
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("archive/tar cannot read an accepted archive: %v", err)
		}
		if h.Typeflag == tar.TypeGNUSparse || hasSparseRecords(h.PAXRecords) {
			t.Fatalf("sparse member %q accepted", h.Name)
		}
		switch h.Typeflag {
		case tar.TypeReg:
			files++
			m, ok := byName[h.Name]
			if !ok || m.Size != h.Size {
				t.Fatalf("archive/tar finds %q of %d bytes, the reader %+v", h.Name, h.Size, m)
			}
			body, err := io.ReadAll(tr)
			if err != nil || !bytes.Equal(body, data[m.Offset:m.Offset+m.Size]) {
				t.Fatalf("member %q: the reader's offset does not hold its bytes (%v)", h.Name, err)
			}
		case tar.TypeXGlobalHeader:
		case tar.TypeDir:
			if h.Size != 0 {
				t.Fatalf("directory %q with contents accepted", h.Name)
			}
		default:
			t.Fatalf("member %q of type %q accepted", h.Name, h.Typeflag)
		}
	}
	if files != len(a.Members) {
		t.Fatalf("archive/tar finds %d files, the reader %d", files, len(a.Members))
	}
}

// FuzzOVAManifest puts any text in an OVA's manifest: when the archive is
// accepted, every line named a member and gave its right digest.
func FuzzOVAManifest(f *testing.F) {
	d := ovatest.Member{Name: "disk1.vmdk", Body: bytes.Repeat([]byte("disk"), 300)}
	f.Add("SHA256(disk1.vmdk)= " + hex.EncodeToString(sum256(d.Body)) + "\n")
	f.Add("SHA1 (disk1.vmdk) = " + hex.EncodeToString(sum1(d.Body)) + "\r\n\nSHA256(app.ovf)=FF\n")
	f.Add("SHA512(disk1.vmdk)= 00\n")
	f.Add("SHA256((a))= 00")
	f.Add("SHA256(disk1.vmdk)= " + strings.Repeat("ab", 32) + "\nSHA256(disk1.vmdk)= " + strings.Repeat("ab", 32) + "\n")
	f.Add(strings.Repeat("x", 70000))
	f.Fuzz(func(t *testing.T, text string) {
		files := []ovatest.Member{d}
		b := ovatest.Build(t, ovatest.Member{Name: "app.ovf", Body: ovatest.OVF(files...)}, d, ovatest.Member{Name: "app.mf", Body: []byte(text)})
		a, err := ReadOVA(bytes.NewReader(b), int64(len(b)), Limits{})
		if err == nil {
			err = a.CheckManifest(context.Background(), bytes.NewReader(b))
		}
		if err != nil {
			if ruleOf(err) != "ova-manifest" && ruleOf(err) != "header-too-large" {
				t.Fatalf("a manifest refused by rule %q: %v", ruleOf(err), err)
			}
			return
		}
		members := map[string][]byte{"disk1.vmdk": d.Body, "app.ovf": ovatest.OVF(files...)}
		for line := range strings.SplitSeq(strings.TrimPrefix(text, "\ufeff"), "\n") {
			line = strings.TrimSpace(line)
			if line == "" {
				continue
			}
			open, closing := strings.Index(line, "("), strings.LastIndex(line, ")")
			eq := strings.LastIndex(line, "=")
			if open < 0 || closing < open || eq < closing {
				t.Fatalf("accepted manifest line %q", line)
			}
			body, ok := members[line[open+1:closing]]
			if !ok {
				t.Fatalf("accepted manifest line %q names no member", line)
			}
			want := map[string][]byte{"SHA1": sum1(body), "SHA256": sum256(body), "SHA512": sum512(body)}[strings.TrimSpace(line[:open])]
			if want == nil || !strings.EqualFold(strings.TrimSpace(line[eq+1:]), hex.EncodeToString(want)) {
				t.Fatalf("accepted manifest line %q with a wrong digest", line)
			}
		}
	})
}

func sum1(b []byte) []byte   { s := sha1.Sum(b); return s[:] }
func sum256(b []byte) []byte { s := sha256.Sum256(b); return s[:] }
func sum512(b []byte) []byte { s := sha512.Sum512(b); return s[:] }
