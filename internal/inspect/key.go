package inspect

import (
	"path"
	"strings"
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
	return refuse("extension-mismatch",
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
