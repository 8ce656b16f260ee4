package inspect

import "testing"

func TestFormatFromKey(t *testing.T) {
	cases := []struct {
		key  string
		want Format
		ok   bool
	}{
		{"disks/win11.vhdx", VHDX, true},
		{"disks/Checkpoint.AVHDX", VHDX, true},
		{"old/xp.vhd", VPC, true},
		{"old/xp.VPC", VPC, true},
		{"vmware/web.vmdk", VMDK, true},
		{"kvm/a.qcow2", Qcow2, true},
		{"kvm/a.QCOW", Qcow2, true},
		{"vbox/a.vdi", VDI, true},
		{"apps/web.ova", OVA, true},
		{"raw/a.img", "", false},
		{"raw/a.raw", "", false},
		{"a.tar", "", false},
		{"noext", "", false},
		{"dir.vhdx/file", "", false},
		{"a.vhdx.gz", "", false},
	}
	for _, tc := range cases {
		got, ok := FormatFromKey(tc.key)
		if got != tc.want || ok != tc.ok {
			t.Errorf("FormatFromKey(%q) = %q, %v; want %q, %v", tc.key, got, ok, tc.want, tc.ok)
		}
	}
}

func TestCheckExtensionRefusesMismatch(t *testing.T) {
	cases := []struct {
		format Format
		key    string
		refuse bool
	}{
		{VHDX, "a.vhdx", false},
		{VHDX, "a.avhdx", false},
		{VPC, "a.vhd", false},
		{Qcow2, "a.img", false},
		{Raw, "a.img", false},
		{OVA, "a.tar", false},
		{Qcow2, "a.vhdx", true},
		{Raw, "a.vmdk", true},
		{VMDK, "a.ova", true},
		{OVA, "a.qcow2", true},
	}
	for _, tc := range cases {
		err := CheckExtension(Report{Format: tc.format}, tc.key)
		if !tc.refuse {
			if err != nil {
				t.Errorf("%s named %s: %v", tc.format, tc.key, err)
			}
			continue
		}
		t.Run(string(tc.format)+"_as_"+tc.key, func(t *testing.T) {
			wantRefusal(t, err, "extension-mismatch")
		})
	}
}
