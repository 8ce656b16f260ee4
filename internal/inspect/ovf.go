package inspect

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"io"
	"path"
	"slices"
	"strconv"
	"strings"

	"github.com/dustin/go-humanize"

	"github.com/imagepipe/imagepipe/events"
)

// ovfEnvelope is the part of an OVF descriptor that says which files the
// appliance is made of. Tags carry no namespace: OVF 1.x and 2.x differ
// only in it.
type ovfEnvelope struct {
	XMLName xml.Name
	Files   []ovfFile `xml:"References>File"`
	Disks   []ovfDisk `xml:"DiskSection>Disk"`
}

type ovfFile struct {
	ID          string `xml:"id,attr"`
	Href        string `xml:"href,attr"`
	Size        string `xml:"size,attr"`
	Compression string `xml:"compression,attr"`
	ChunkSize   string `xml:"chunkSize,attr"`
}

type ovfDisk struct {
	FileRef string `xml:"fileRef,attr"`
}

func parseOVF(b []byte) (*ovfEnvelope, error) {
	var env ovfEnvelope
	d := xml.NewDecoder(bytes.NewReader(b))
	// A descriptor in another encoding is still read as far as its markup
	// is ASCII; names outside ASCII then fail the membership check.
	d.CharsetReader = func(_ string, r io.Reader) (io.Reader, error) { return r, nil }
	if err := d.Decode(&env); err != nil {
		return nil, refuse(events.RuleOVADescriptor, sugOVA, "the OVA's .ovf descriptor is not valid XML: %v", err)
	}
	if env.XMLName.Local != "Envelope" {
		return nil, refuse(events.RuleOVADescriptor, sugOVA, "the OVA's .ovf descriptor is a <%s>, not an OVF <Envelope>", printable([]byte(env.XMLName.Local)))
	}
	return &env, nil
}

// checkDeclared holds the archive to its descriptor: each file the
// descriptor references is in the archive, no bigger than declared, and
// each member is either a referenced file or the descriptor's own manifest
// or certificate.
func (a *OVAArchive) checkDeclared(env *ovfEnvelope) error {
	declared := map[string]bool{}
	for _, f := range env.Files {
		href := printable([]byte(f.Href))
		if f.ChunkSize != "" {
			return refuse(events.RuleOVADescriptor, sugOVA, "the descriptor splits %s into chunks, which is not accepted", href)
		}
		if f.Compression != "" && f.Compression != "identity" {
			return refuse(events.RuleOVADescriptor, sugOVA, "the descriptor says %s is %s-compressed, which is not accepted", href, printable([]byte(f.Compression)))
		}
		m, ok := a.member(f.Href)
		if !ok {
			return refuse(events.RuleOVADescriptor, sugOVA,
				"the descriptor references %s, which is not in the archive; an OVA holds every file of its appliance", href)
		}
		if declared[f.Href] {
			return refuse(events.RuleOVADescriptor, sugOVA, "the descriptor references %s twice", href)
		}
		declared[f.Href] = true
		if f.Size == "" {
			continue
		}
		size, err := strconv.ParseInt(f.Size, 10, 64)
		if err != nil || size < 0 {
			return refuse(events.RuleOVADescriptor, sugOVA, "the descriptor gives %s the size %s, which is not a number of bytes", href, printable([]byte(f.Size)))
		}
		// A member shorter than declared is left to the inspection of the
		// disk itself (real exporters write estimates there); one longer
		// holds bytes the appliance does not account for.
		if m.Size > size {
			return refuse(events.RuleOVAMemberSize, sugOVA,
				"the archive member %s is %d bytes, more than the %d its descriptor declares", href, m.Size, size)
		}
	}
	for _, m := range a.Members {
		if declared[m.Name] || m.Name == a.Descriptor || m.Name == a.Manifest ||
			strings.EqualFold(path.Ext(m.Name), ".cert") {
			continue
		}
		return refuse(events.RuleOVAUndeclaredMember, sugOVATar,
			"the archive member %s is not declared in the descriptor's <References>, so nothing says what it is", printable([]byte(m.Name)))
	}
	return nil
}

// pickDisks chooses the members to convert and applies the caps on them.
func (a *OVAArchive) pickDisks(env *ovfEnvelope, lim Limits) error {
	diskFile := map[string]bool{}
	for _, d := range env.Disks {
		for _, f := range env.Files {
			if f.ID != "" && f.ID == d.FileRef {
				diskFile[f.Href] = true
			}
		}
	}
	for _, f := range env.Files {
		_, named := FormatFromKey(f.Href)
		if named || slices.Contains([]string{".img", ".raw"}, strings.ToLower(path.Ext(f.Href))) {
			diskFile[f.Href] = true
		}
	}
	for _, m := range a.Members {
		if !diskFile[m.Name] {
			continue
		}
		if format, _ := FormatFromKey(m.Name); format == OVA {
			return refuse(events.RuleOVAMember, sugOVA, "the OVA holds another OVA, %s; upload the appliances one by one", printable([]byte(m.Name)))
		}
		if lim.MaxVirtualSize > 0 && m.Size > lim.MaxVirtualSize {
			return refuse(events.RuleOVASize, fmt.Sprintf("shrink the disk inside the guest and re-export it, or ask an operator to raise the limit of %s", humanize.IBytes(uint64(lim.MaxVirtualSize))),
				"the OVA's disk %s is %s, above the limit of %s set by IMAGEPIPE_MAX_VIRTUAL_SIZE",
				printable([]byte(m.Name)), humanize.IBytes(uint64(m.Size)), humanize.IBytes(uint64(lim.MaxVirtualSize)))
		}
		a.Disks = append(a.Disks, m)
	}
	if len(a.Disks) == 0 {
		return refuse(events.RuleOVANoDisk, sugOVA, "the OVA holds no disk image")
	}
	if max := lim.ovaMaxDisks(); len(a.Disks) > max {
		return refuse(events.RuleOVADisks, "split the appliance, or ask an operator to raise IMAGEPIPE_OVA_MAX_DISKS",
			"the OVA holds %d disks, more than the %d set by IMAGEPIPE_OVA_MAX_DISKS", len(a.Disks), max)
	}
	return nil
}
