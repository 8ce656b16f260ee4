// Package ovatest builds OVA archives for tests, good ones and the hostile
// shapes the OVA reader must refuse: sparse members claiming sizes far
// beyond their bytes, links, devices and duplicate names. archive/tar
// writes no sparse headers, so those are patched into place by hand.
package ovatest

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"html"
	"path"
	"strconv"
	"strings"
	"testing"
)

// Member is one entry of an archive.
type Member struct {
	Name string
	Body []byte
	// Type is the tar type flag; 0 is a regular file.
	Type byte
	// Link is the target of a link.
	Link string
	// Sparse makes the member sparse, claiming this many bytes while its
	// body holds 512: SparseGNU as an old GNU 'S' header, SparsePAX with
	// GNU.sparse.* records in a PAX header.
	Sparse     int64
	SparseForm SparseForm
}

// SparseForm is how a sparse member is written.
type SparseForm int

const (
	SparseGNU SparseForm = iota
	SparsePAX
)

// Build writes members as a tar archive, in order.
func Build(tb testing.TB, members ...Member) []byte {
	tb.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, m := range members {
		if m.Sparse > 0 {
			if err := writeSparse(tw, &buf, m); err != nil {
				tb.Fatal(err)
			}
			continue
		}
		typ := m.Type
		if typ == 0 {
			typ = tar.TypeReg
		}
		h := &tar.Header{Name: m.Name, Mode: 0o644, Typeflag: typ, Linkname: m.Link, Format: tar.FormatPAX}
		if typ == tar.TypeReg || typ == tar.TypeDir {
			h.Size = int64(len(m.Body))
		}
		if typ == tar.TypeChar || typ == tar.TypeBlock {
			h.Devmajor, h.Devminor = 1, 3
		}
		if err := tw.WriteHeader(h); err != nil {
			tb.Fatalf("tar header %q: %v", m.Name, err)
		}
		if h.Size > 0 {
			if _, err := tw.Write(m.Body); err != nil {
				tb.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		tb.Fatal(err)
	}
	return buf.Bytes()
}

// writeSparse writes a member whose header claims m.Sparse bytes, of which
// the first 512 are stored.
func writeSparse(tw *tar.Writer, buf *bytes.Buffer, m Member) error {
	body := make([]byte, 512)
	copy(body, m.Body)
	// Pad the member before, so that the header starts where it is found.
	if err := tw.Flush(); err != nil {
		return err
	}
	switch m.SparseForm {
	case SparsePAX:
		// archive/tar drops GNU.sparse.* records it is given; they are
		// written under another name of the same length and renamed.
		start := buf.Len()
		h := &tar.Header{Name: m.Name, Mode: 0o644, Typeflag: tar.TypeReg, Size: 512, Format: tar.FormatPAX,
			PAXRecords: map[string]string{
				"XNU.sparse.size":      strconv.FormatInt(m.Sparse, 10),
				"XNU.sparse.numblocks": "1",
				"XNU.sparse.map":       "0,512",
			}}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		b := buf.Bytes()[start:]
		copy(b, bytes.ReplaceAll(b, []byte("XNU.sparse."), []byte("GNU.sparse.")))
	default:
		start := buf.Len()
		h := &tar.Header{Name: m.Name, Mode: 0o644, Typeflag: tar.TypeReg, Size: 512, Format: tar.FormatGNU}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		blk := buf.Bytes()[start : start+512]
		blk[156] = tar.TypeGNUSparse
		// One sparse entry: 512 bytes of data at offset 0.
		copy(blk[386:398], octal(0, 12))
		copy(blk[398:410], octal(512, 12))
		blk[482] = 0 // no extension blocks
		// The real size, base-256: it may not fit octal.
		clear(blk[483:495])
		blk[483] = 0x80
		for i, v := 0, uint64(m.Sparse); i < 8; i++ {
			blk[494-i] = byte(v >> (8 * i))
		}
		sum := 0
		copy(blk[148:156], "        ")
		for _, c := range blk {
			sum += int(c)
		}
		copy(blk[148:156], fmt.Sprintf("%06o\x00 ", sum))
	}
	_, err := tw.Write(body)
	return err
}

func octal(v int64, n int) []byte {
	return []byte(fmt.Sprintf("%0*o\x00", n-1, v))
}

// OVF is a descriptor declaring the given members in its References, with
// their sizes, and those named like disks in its DiskSection.
func OVF(members ...Member) []byte {
	var b strings.Builder
	b.WriteString(`<?xml version="1.0" encoding="UTF-8"?>` + "\n")
	b.WriteString(`<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1">` + "\n  <References>\n")
	for i, m := range members {
		fmt.Fprintf(&b, "    <File ovf:id=\"file%d\" ovf:href=\"%s\" ovf:size=\"%d\"/>\n", i+1, html.EscapeString(m.Name), len(m.Body))
	}
	b.WriteString("  </References>\n  <DiskSection>\n    <Info>Virtual disk information</Info>\n")
	for i, m := range members {
		if isDisk(m.Name) {
			fmt.Fprintf(&b, "    <Disk ovf:diskId=\"vmdisk%d\" ovf:fileRef=\"file%d\" ovf:capacity=\"1\"/>\n", i+1, i+1)
		}
	}
	b.WriteString("  </DiskSection>\n</Envelope>\n")
	return []byte(b.String())
}

func isDisk(name string) bool {
	switch strings.ToLower(path.Ext(name)) {
	case ".vmdk", ".img", ".qcow2", ".vhd", ".vhdx", ".vdi":
		return true
	}
	return false
}

// Manifest lists the SHA256 of each member; sums overrides the digest of
// the members it names.
func Manifest(members []Member, sums map[string]string) []byte {
	var b strings.Builder
	for _, m := range members {
		sum, ok := sums[m.Name]
		if !ok {
			s := sha256.Sum256(m.Body)
			sum = hex.EncodeToString(s[:])
		}
		fmt.Fprintf(&b, "SHA256(%s)= %s\n", m.Name, sum)
	}
	return []byte(b.String())
}

// Appliance is a well-formed OVA named app: its descriptor first,
// declaring files, then files, then a manifest of them whose digests sums
// overrides. The manifest comes last, as some exporters write it, so that
// a reader checking digests as it goes has already used the files.
func Appliance(tb testing.TB, files []Member, sums map[string]string) []byte {
	tb.Helper()
	all := append([]Member{{Name: "app.ovf", Body: OVF(files...)}}, files...)
	all = append(all, Member{Name: "app.mf", Body: Manifest(files, sums)})
	return Build(tb, all...)
}
