package inspect

import (
	"bytes"
	"encoding/json"
	"fmt"
	"path/filepath"
	"sort"
	"strings"

	"github.com/imagepipe/imagepipe/events"
)

// CheckQemuInfo checks the output of `qemu-img info --output=json -f FMT`
// for the image at imagePath against the report Inspect made of it. It is
// the second line of defence: anything qemu-img would reach outside the
// file, or any disagreement about what the file is, refuses the image.
// It returns the virtual size qemu-img reports, which is the one conversion
// produces. The caller bounds the size of infoJSON: a hostile image can
// make qemu-img print a great deal (a huge snapshot table, for one).
func CheckQemuInfo(rep Report, infoJSON []byte, imagePath string, lim Limits) (virtualSize int64, err error) {
	var info map[string]any
	dec := json.NewDecoder(bytes.NewReader(infoJSON))
	dec.UseNumber()
	if err := dec.Decode(&info); err != nil {
		return 0, fmt.Errorf("parse qemu-img info output: %w", err)
	}

	format, _ := info["format"].(string)
	if Format(format) != rep.Format {
		return 0, refuse(events.RuleFormatMismatch, sugReexport,
			"qemu-img reads the file as %s but its header says %s", printable([]byte(format)), rep.Format)
	}
	for _, k := range []string{"backing-filename", "full-backing-filename"} {
		if v, ok := info[k]; ok {
			return 0, refuse(events.RuleBackingFile, sugFlatten,
				"qemu-img reports a backing file %s", printable([]byte(fmt.Sprint(v))))
		}
	}
	specific, _ := info["format-specific"].(map[string]any)
	data, _ := specific["data"].(map[string]any)
	if v, ok := data["data-file"]; ok {
		return 0, refuse(events.RuleDataFile, sugMergeDataFile,
			"qemu-img reports an external data file %s", printable([]byte(fmt.Sprint(v))))
	}
	if rep.Format == VMDK {
		if err := checkExtents(data, imagePath); err != nil {
			return 0, err
		}
	}
	if name, ok := findProtocolName(info); ok {
		return 0, refuse(events.RuleProtocolFilename, sugReexport,
			"qemu-img reports a file name with a protocol or JSON specification: %s", printable([]byte(name)))
	}

	n, ok := info["virtual-size"].(json.Number)
	if !ok {
		return 0, fmt.Errorf("qemu-img info output has no virtual-size")
	}
	size, err := n.Int64()
	if err != nil || size < 0 {
		return 0, refuse(events.RuleVirtualSize, sugReexport, "qemu-img reports an unusable virtual size %s", n)
	}
	if lim.MaxVirtualSize > 0 && size > lim.MaxVirtualSize {
		return 0, refuseSize(rep.Format, size, lim)
	}
	return size, nil
}

// checkExtents requires the single extent of a single-file VMDK to be the
// image itself.
func checkExtents(data map[string]any, imagePath string) error {
	extents, _ := data["extents"].([]any)
	if len(extents) != 1 {
		return refuse(events.RuleVMDKExtent, sugSingleVMDK,
			"qemu-img reports %d extents; a single-file VMDK has exactly one", len(extents))
	}
	e, _ := extents[0].(map[string]any)
	name, _ := e["filename"].(string)
	if !samePath(name, imagePath) {
		return refuse(events.RuleVMDKExtent, sugSingleVMDK,
			"qemu-img reports the extent %s, which is not the uploaded file", printable([]byte(name)))
	}
	return nil
}

func samePath(a, b string) bool {
	if a == "" || b == "" {
		return false
	}
	if filepath.Clean(a) == filepath.Clean(b) {
		return true
	}
	aa, err1 := filepath.Abs(a)
	ab, err2 := filepath.Abs(b)
	return err1 == nil && err2 == nil && aa == ab
}

// findProtocolName walks the whole document, because qemu-img nests
// filenames in format-specific data and, in later versions, in children.
// Keys are visited in order so that the reported name is deterministic.
func findProtocolName(v any) (string, bool) {
	switch v := v.(type) {
	case map[string]any:
		keys := make([]string, 0, len(v))
		for k := range v {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			if s, ok := v[k].(string); ok && isFilenameKey(k) && hasProtocol(s) {
				return s, true
			}
			if name, ok := findProtocolName(v[k]); ok {
				return name, true
			}
		}
	case []any:
		for _, e := range v {
			if name, ok := findProtocolName(e); ok {
				return name, true
			}
		}
	}
	return "", false
}

func isFilenameKey(k string) bool {
	return strings.HasSuffix(k, "filename") || k == "data-file" || k == "file"
}

// hasProtocol reports whether QEMU would read name as a protocol or a
// JSON specification rather than a plain path: like QEMU's
// path_has_protocol, a colon before the first slash makes a prefix a
// protocol ("nbd:", "http:", "json:").
func hasProtocol(name string) bool {
	if strings.HasPrefix(name, "json:") || strings.Contains(name, "://") {
		return true
	}
	i := strings.IndexAny(name, ":/")
	return i >= 0 && name[i] == ':'
}
