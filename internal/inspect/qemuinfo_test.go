package inspect

import (
	"errors"
	"testing"
)

// Real qemu-img output for safe fixtures is checked in
// TestInspectDetectsAcceptedFormats; these are the hostile answers qemu-img
// would give for files that should never have reached it.
func TestCheckQemuInfoRefusesHostileReports(t *testing.T) {
	const img = "/scratch/job/a.img"
	qcow := Report{Format: Qcow2, VirtualSize: 1 << 30}
	vmdk := Report{Format: VMDK, VirtualSize: 1 << 30}
	cases := []struct {
		name string
		rep  Report
		json string
		lim  Limits
		rule string
	}{
		{"FormatMismatch", qcow, `{"format":"raw","virtual-size":1073741824,"filename":"/scratch/job/a.img"}`, Limits{}, "format-mismatch"},
		{"MissingFormat", qcow, `{"virtual-size":1073741824}`, Limits{}, "format-mismatch"},
		{"BackingFile", qcow, `{"format":"qcow2","virtual-size":1073741824,"backing-filename":"base.qcow2","full-backing-filename":"/scratch/job/base.qcow2"}`, Limits{}, "backing-file"},
		{"FullBackingFileOnly", qcow, `{"format":"qcow2","virtual-size":1073741824,"full-backing-filename":"/etc/passwd"}`, Limits{}, "backing-file"},
		{"JSONBackingFile", qcow, `{"format":"qcow2","virtual-size":1073741824,"backing-filename":"json:{\"file\":{\"driver\":\"nbd\"}}"}`, Limits{}, "backing-file"},
		{"DataFile", qcow, `{"format":"qcow2","virtual-size":1073741824,"format-specific":{"type":"qcow2","data":{"compat":"1.1","data-file":"/etc/shadow","data-file-raw":true}}}`, Limits{}, "data-file"},
		{"VirtualSizeOverLimit", qcow, `{"format":"qcow2","virtual-size":1073741824}`, Limits{MaxVirtualSize: 1 << 29}, "virtual-size"},
		{"NegativeVirtualSize", qcow, `{"format":"qcow2","virtual-size":-1}`, Limits{}, "virtual-size"},
		{"VirtualSizeBeyondInt64", qcow, `{"format":"qcow2","virtual-size":18446744073709551615}`, Limits{}, "virtual-size"},
		{"ProtocolFilename", qcow, `{"format":"qcow2","virtual-size":1073741824,"filename":"nbd://evil.example/export"}`, Limits{}, "protocol-filename"},
		{"JSONFilename", qcow, `{"format":"qcow2","virtual-size":1073741824,"filename":"json:{\"driver\":\"http\",\"url\":\"http://x/\"}"}`, Limits{}, "protocol-filename"},
		{"NestedProtocolFilename", qcow, `{"format":"qcow2","virtual-size":1073741824,"children":[{"name":"file","info":{"filename":"ssh://host/disk"}}]}`, Limits{}, "protocol-filename"},
		{"VMDKWithTwoExtents", vmdk, `{"format":"vmdk","virtual-size":1073741824,"filename":"/scratch/job/a.img","format-specific":{"type":"vmdk","data":{"create-type":"twoGbMaxExtentSparse","extents":[{"filename":"/scratch/job/a-s001.vmdk"},{"filename":"/scratch/job/a-s002.vmdk"}]}}}`, Limits{}, "vmdk-extent"},
		{"VMDKWithoutExtents", vmdk, `{"format":"vmdk","virtual-size":1073741824,"filename":"/scratch/job/a.img"}`, Limits{}, "vmdk-extent"},
		{"VMDKExtentElsewhere", vmdk, `{"format":"vmdk","virtual-size":1073741824,"filename":"/scratch/job/a.img","format-specific":{"type":"vmdk","data":{"create-type":"monolithicFlat","extents":[{"filename":"/etc/passwd","format":"FLAT"}]}}}`, Limits{}, "vmdk-extent"},
		{"VMDKExtentJSON", vmdk, `{"format":"vmdk","virtual-size":1073741824,"filename":"/scratch/job/a.img","format-specific":{"type":"vmdk","data":{"extents":[{"filename":"json:{\"driver\":\"file\",\"filename\":\"/dev/sda\"}"}]}}}`, Limits{}, "vmdk-extent"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := CheckQemuInfo(tc.rep, []byte(tc.json), img, tc.lim)
			wantRefusal(t, err, tc.rule)
		})
	}
}

func TestCheckQemuInfoAcceptsSingleFileVMDK(t *testing.T) {
	const info = `{"virtual-size":1048576,"filename":"/scratch/job/./a.img","format":"vmdk","format-specific":{"type":"vmdk","data":{"cid":1,"parent-cid":4294967295,"create-type":"monolithicSparse","extents":[{"virtual-size":1048576,"filename":"/scratch/job/a.img","cluster-size":65536,"format":""}]}}}`
	got, err := CheckQemuInfo(Report{Format: VMDK}, []byte(info), "/scratch/job/a.img", Limits{MaxVirtualSize: 1 << 20})
	if err != nil || got != 1<<20 {
		t.Fatalf("got %d, %v", got, err)
	}
}

func TestCheckQemuInfoReportsUnparsableOutputAsError(t *testing.T) {
	for _, in := range []string{"", "qemu-img: Could not open", `{"format":"raw"`, `{"format":"raw"}`} {
		_, err := CheckQemuInfo(Report{Format: Raw}, []byte(in), "a.img", Limits{})
		var ref *Refusal
		if err == nil || errors.As(err, &ref) {
			t.Errorf("%q: want a plain error, got %v", in, err)
		}
	}
}

func TestHasProtocol(t *testing.T) {
	cases := map[string]bool{
		"/scratch/job/a.img":     false,
		"a.img":                  false,
		"./nbd:x":                false,
		"/tmp/job:1/a.img":       false,
		"nbd:localhost:10809":    true,
		"nbd://localhost/export": true,
		"json:{}":                true,
		"http://example.com/a":   true,
		"file:/etc/passwd":       true,
		"gluster+tcp://h/v/a":    true,
		"disk:1.vmdk":            true,
	}
	for name, want := range cases {
		if got := hasProtocol(name); got != want {
			t.Errorf("hasProtocol(%q) = %v, want %v", name, got, want)
		}
	}
}
