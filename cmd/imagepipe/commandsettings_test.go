package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Settings only a function reads, each bad.
var functionOnlySettings = map[string]string{
	"IMAGEPIPE_SCRATCH_DIR":   "/nonexistent/scratch",       // convert's
	"IMAGEPIPE_NOTIFY_ON":     "everything",                 // notify's
	"IMAGEPIPE_IMPORT_PROXY":  "ftp://proxy.example.com:21", // ingest's
	"IMAGEPIPE_STALL_AFTER":   "soon",                       // notify's
	"IMAGEPIPE_OVA_MAX_DISKS": "0",                          // convert's
}

func TestCommandsReadOnlyTheSettingsTheyUse(t *testing.T) {
	disk := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(disk, make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args  []string
		where string // what the command got as far as: the service it uses
	}{
		{[]string{"ctl", "status"}, "IMAGEPIPE_NATS_URL"},
		{[]string{"reconvert", "uploads/x.vhdx"}, "IMAGEPIPE_NATS_URL"},
		{[]string{"status", "uploads/x.vhdx"}, "IMAGEPIPE_NATS_URL"},
		{[]string{"dedup", "prune"}, "IMAGEPIPE_NATS_URL"},
		{[]string{"upload", disk, "--no-wait"}, "IMAGEPIPE_S3_ENDPOINT"},
	} {
		t.Run(strings.Join(tc.args[:1], " "), func(t *testing.T) {
			cleanConfig(t)
			t.Setenv("IMAGEPIPE_CONNECT_TIMEOUT", "1s")
			for k, v := range functionOnlySettings {
				t.Setenv(k, v)
			}
			var out, errb bytes.Buffer
			code := run(tc.args, &out, &errb)
			for k := range functionOnlySettings {
				if strings.Contains(errb.String(), k) {
					t.Errorf("%v refused %s, a setting it does not read (exit %d):\n%s", tc.args, k, code, errb.String())
				}
			}
			if code != 1 || !strings.Contains(errb.String(), tc.where) {
				t.Errorf("%v: exit %d, want 1 naming %s, as far as it gets without a server:\n%s", tc.args, code, tc.where, errb.String())
			}
		})
	}
}

func TestCommandsStillRefuseABadSettingTheyUse(t *testing.T) {
	cleanConfig(t)
	t.Setenv("IMAGEPIPE_NATS_URL", "ftp://nats.example.com")
	var out, errb bytes.Buffer
	if code := run([]string{"ctl", "status"}, &out, &errb); code == 0 || !strings.Contains(errb.String(), `IMAGEPIPE_NATS_URL="ftp://nats.example.com"`) {
		t.Errorf("ctl status with a bad NATS URL: exit %d:\n%s", code, errb.String())
	}
	cleanConfig(t)
	t.Setenv("IMAGEPIPE_INPUT_BUCKET", "Not_A_Bucket")
	errb.Reset()
	if code := run([]string{"upload", "disk.raw"}, &out, &errb); code == 0 || !strings.Contains(errb.String(), "IMAGEPIPE_INPUT_BUCKET") {
		t.Errorf("upload into a bad bucket name: exit %d:\n%s", code, errb.String())
	}
}
