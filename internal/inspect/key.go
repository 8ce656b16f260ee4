package inspect

import (
	"fmt"
	"path"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/imagepipe/imagepipe/events"
)

var extensionFormats = map[string]Format{
	".vhdx":  VHDX,
	".avhdx": VHDX,
	".vhd":   VPC,
	".vpc":   VPC,
	".vmdk":  VMDK,
	".qcow2": Qcow2,
	".qcow":  Qcow2,
	".vdi":   VDI,
	".ova":   OVA,
}

// FormatFromKey maps an object key's extension, case-insensitively, to the
// format it names. Names such as .img and .raw promise nothing about the
// content, so they, like unknown extensions, report ok=false.
func FormatFromKey(key string) (Format, bool) {
	f, ok := extensionFormats[strings.ToLower(path.Ext(key))]
	return f, ok
}

// CheckExtension refuses an image whose key names a format other than the
// one its content has. The name is what the uploader meant; a mismatch is
// either a mistake worth reporting or content trying to pass as something
// else.
func CheckExtension(rep Report, key string) error {
	named, ok := FormatFromKey(key)
	if !ok || named == rep.Format {
		return nil
	}
	return refuse(events.RuleExtensionMismatch,
		"check that the right file was uploaded, or rename it to match its content (."+extensionFor(rep.Format)+")",
		"the name %s says %s but the content is %s", printable([]byte(path.Base(key))), named, rep.Format)
}

func extensionFor(f Format) string {
	switch f {
	case VPC:
		return "vhd"
	case Raw:
		return "raw or .img"
	}
	return string(f)
}

// CheckName says why a name chosen by an uploader cannot be carried on, or
// nil; noun ("key", "member name") starts the reason. Object keys and the
// names of members inside an OVA both travel on into output keys, error
// report keys, logs, chat messages and, through tools such as mc mirror or
// s3fs, file names. A control character can forge a log line or a terminal
// escape; a ".." segment is resolved by every tool that maps keys onto a
// file system and would place an output outside its folder; bidirectional
// controls make a name read as another. Spaces, "+" and other unicode are
// fine: the name is carried exactly.
func CheckName(noun, name string) error {
	if !utf8.ValidString(name) {
		return fmt.Errorf("the %s is not valid UTF-8", noun)
	}
	for i, r := range name {
		if unicode.IsControl(r) || unicode.Is(unicode.Bidi_Control, r) {
			return fmt.Errorf("the %s holds the control character %U at byte %d", noun, r, i)
		}
	}
	for _, seg := range strings.Split(name, "/") {
		if seg == ".." {
			return fmt.Errorf(`the %s has a ".." segment, which would place its output outside its folder`, noun)
		}
	}
	return nil
}
