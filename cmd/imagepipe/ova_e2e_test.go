package main

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/inspect/ovatest"
)

// An OVA is an archive chosen by the uploader; these tests send the
// archives an attacker would and check that each is refused whole, by a
// named rule, before anything is extracted or published.

// storedOutput is what an output object is: its bytes' sha256 and the
// version S3 holds.
type storedOutput struct {
	sha256, etag string
	modified     time.Time
}

// outputsOf lists the outputs under prefix with their bytes' sha256.
func outputsOf(t *testing.T, prefix string) map[string]storedOutput {
	t.Helper()
	out := map[string]storedOutput{}
	for _, key := range outputsUnder(t, prefix) {
		info, err := e2e.s3.StatObject(context.Background(), "images", key, minio.StatObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		sum, _ := downloadSum(t, "images", key)
		out[key] = storedOutput{sha256: sum, etag: info.ETag, modified: info.LastModified}
	}
	return out
}

// awaitOVARefusal waits for the final failure of key and checks it is a
// refusal by rule at inspection, on the first attempt, that extracted,
// converted and uploaded nothing.
func awaitOVARefusal(t *testing.T, res *results, key, rule string) events.Failed {
	t.Helper()
	f := awaitFailure(t, res, key)
	if f.Rule != rule || f.Phase != events.PhaseInspect || f.WillRetry || f.Attempt != 1 {
		t.Errorf("failure %+v, want a refusal by rule %s at inspect, not retried", f, rule)
	}
	for _, stage := range []string{"msg=extracting", "msg=converting", "msg=uploading"} {
		if line := logLine(t, f.JobID, stage); line != "" {
			t.Errorf("a refused OVA went on to %s: %s", stage, line)
		}
	}
	return f
}

// assertNoOutputs checks that nothing was written under key.
func assertNoOutputs(t *testing.T, key string) {
	t.Helper()
	if outs := outputsUnder(t, key); len(outs) != 0 {
		t.Errorf("a refused OVA left outputs %v", outs)
	}
}

// vmdkDisk is a monolithicSparse VMDK made by qemu-img with the pattern
// written at the offset, and what `qemu-img convert -O raw` makes of it.
func vmdkDisk(t *testing.T, name string, pattern byte, at string) (ovatest.Member, string) {
	t.Helper()
	dir := t.TempDir()
	p := makeImage(t, dir, name, "vmdk", fmt.Sprintf("write -P 0x%02x %s 1M", pattern, at))
	sum, _ := localRaw(t, p, "vmdk")
	body, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return ovatest.Member{Name: name, Body: body}, sum
}

func TestOVAWithSparseMemberClaimingAPetabyteIsRefusedNotRetried(t *testing.T) {
	res := subscribeResults(t)
	for _, form := range []struct {
		name string
		form ovatest.SparseForm
	}{{"gnu", ovatest.SparseGNU}, {"pax", ovatest.SparsePAX}} {
		t.Run(form.name, func(t *testing.T) {
			sparse := ovatest.Member{Name: "disk1.vmdk", Sparse: 1 << 50, SparseForm: form.form}
			body := ovatest.Build(t, ovatest.Member{Name: "app.ovf", Body: ovatest.OVF(ovatest.Member{Name: "disk1.vmdk"})}, sparse)
			if len(body) > 16<<10 {
				t.Fatalf("fixture is %d bytes, want about 10 KiB", len(body))
			}
			key := "e2e/ova-trust/sparse-" + form.name + ".ova"
			putObject(t, key, body, nil)
			f := awaitOVARefusal(t, res, key, "ova-sparse")
			assertNoOutputs(t, key)
			if !strings.Contains(f.Message, "1.0 PiB") {
				t.Errorf("message %q does not say what the member claims", f.Message)
			}
			// The job's scratch is gone, and nothing near the claim was
			// ever written: what is left in scratch is tiny.
			if n := scratchBytes(t); n > 1<<20 {
				t.Errorf("scratch holds %d bytes after the refusal", n)
			}
		})
	}
}

// scratchBytes is the space the files in the stack's scratch directory
// take on disk.
func scratchBytes(t *testing.T) int64 {
	t.Helper()
	var n int64
	err := filepath.WalkDir(e2e.scratch, func(_ string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		if info, err := d.Info(); err == nil {
			n += info.Size()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestOVAManifestStoredAfterTheDiskIsCheckedBeforeAnythingIsPublished(t *testing.T) {
	res := subscribeResults(t)
	good, goodSum := vmdkDisk(t, "web-disk1.vmdk", 0x61, "0")
	key := "e2e/ova-trust/tampered/web.ova"
	putObject(t, key, ovatest.Appliance(t, []ovatest.Member{good}, nil), nil)
	c := converted(t, res.await(t, key, 90*time.Second))
	if want := events.OVADiskKey("", key, good.Name, "raw"); c.OutputKey != want || c.SHA256 != goodSum {
		t.Fatalf("good OVA converted to %s (%s), want %s (%s)", c.OutputKey, c.SHA256, want, goodSum)
	}
	before := outputsOf(t, key)

	// The same appliance with another disk in it, and the manifest, stored
	// after the disk, still giving the good disk's digest.
	evil, _ := vmdkDisk(t, "web-disk1.vmdk", 0x66, "0")
	putObject(t, key, ovatest.Appliance(t, []ovatest.Member{evil}, map[string]string{evil.Name: sha256Hex(good.Body)}), nil)
	awaitOVARefusal(t, res, key, "ova-manifest")
	assertOutputsUnchanged(t, key, before)
}

func TestOVAWhoseSecondDiskFailsPublishesNeitherDisk(t *testing.T) {
	res := subscribeResults(t)
	d1, sum1 := vmdkDisk(t, "web-disk1.vmdk", 0x31, "0")
	d2, sum2 := vmdkDisk(t, "web-disk2.vmdk", 0x32, "5M")
	key := "e2e/ova-trust/second-disk/web.ova"
	putObject(t, key, ovatest.Appliance(t, []ovatest.Member{d1, d2}, nil), nil)
	got := map[string]string{}
	for range 2 {
		c := converted(t, res.await(t, key, 90*time.Second))
		got[c.OutputKey] = c.SHA256
	}
	want := map[string]string{events.OVADiskKey("", key, d1.Name, "raw"): sum1, events.OVADiskKey("", key, d2.Name, "raw"): sum2}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("good OVA outputs %v, want %v", got, want)
	}
	before := outputsOf(t, key)

	// Disk 1 changed and sound, disk 2 a streamOptimized VMDK cut short:
	// the manifest matches both, so only converting disk 2 finds it bad,
	// after disk 1 has converted.
	newD1, _ := vmdkDisk(t, "web-disk1.vmdk", 0x41, "0")
	dir := t.TempDir()
	p := makeImage(t, dir, "src.vmdk", "vmdk", "write -P 0x42 0 2M")
	so := filepath.Join(dir, "so.vmdk")
	runTool(t, "qemu-img", "convert", "-f", "vmdk", "-O", "vmdk", "-o", "subformat=streamOptimized", p, so)
	body, err := os.ReadFile(so)
	if err != nil {
		t.Fatal(err)
	}
	broken := ovatest.Member{Name: "web-disk2.vmdk", Body: body[:len(body)/2]}
	putObject(t, key, ovatest.Appliance(t, []ovatest.Member{newD1, broken}, nil), nil)
	f := awaitFailure(t, res, key)
	if f.Phase != events.PhaseConvert || f.WillRetry {
		t.Errorf("failure %+v, want qemu-img to find disk 2 bad, for good", f)
	}
	if line := logLine(t, f.JobID, "member=web-disk1.vmdk"); !strings.Contains(logLine(t, f.JobID, "msg=verifying"), "member=web-disk1.vmdk") {
		t.Errorf("disk 1 was not converted and verified before disk 2 failed (%s)", line)
	}
	if line := logLine(t, f.JobID, "msg=uploading"); line != "" {
		t.Errorf("an upload started before every disk was verified: %s", line)
	}
	assertOutputsUnchanged(t, key, before)
}

// assertOutputsUnchanged checks that the outputs under prefix are the
// ones before: same keys, same bytes, same stored version.
func assertOutputsUnchanged(t *testing.T, prefix string, before map[string]storedOutput) {
	t.Helper()
	after := outputsOf(t, prefix)
	if a, b := slices.Sorted(maps.Keys(after)), slices.Sorted(maps.Keys(before)); !slices.Equal(a, b) {
		t.Errorf("outputs %v after the failed OVA, want %v", a, b)
	}
	for k, b := range before {
		if a := after[k]; a != b {
			t.Errorf("%s changed: %+v, was %+v", k, a, b)
		}
	}
}

func TestOVAWithMoreMembersThanTheCapAndASymlinkAtMember101IsRefusedWhole(t *testing.T) {
	res := subscribeResults(t)
	disk, _ := vmdkDisk(t, "disk001.vmdk", 0x11, "0")
	members := []ovatest.Member{{Name: "app.ovf", Body: ovatest.OVF(disk)}, disk}
	for i := 3; i <= 150; i++ {
		m := ovatest.Member{Name: fmt.Sprintf("disk%03d.vmdk", i), Body: disk.Body[:4096]}
		if i == 101 {
			m = ovatest.Member{Name: m.Name, Type: tar.TypeSymlink, Link: "/etc/shadow"}
		}
		members = append(members, m)
	}
	key := "e2e/ova-trust/many/app.ova"
	putObject(t, key, ovatest.Build(t, members...), nil)
	f := awaitOVARefusal(t, res, key, "ova-members")
	assertNoOutputs(t, key)
	if !strings.Contains(f.Message, "IMAGEPIPE_OVA_MAX_MEMBERS") {
		t.Errorf("message %q does not name the setting", f.Message)
	}
}

func TestOVAWithDuplicateMemberNamesIsRefused(t *testing.T) {
	res := subscribeResults(t)
	d1, _ := vmdkDisk(t, "disk1.vmdk", 0x21, "0")
	d2, _ := vmdkDisk(t, "disk1.vmdk", 0x22, "0")
	key := "e2e/ova-trust/duplicate/app.ova"
	putObject(t, key, ovatest.Build(t, ovatest.Member{Name: "app.ovf", Body: ovatest.OVF(d1)}, d1, d2), nil)
	awaitOVARefusal(t, res, key, "ova-duplicate-member")
	assertNoOutputs(t, key)
}

func TestOVAMemberNamedWithControlOrBidiCharactersIsRefused(t *testing.T) {
	res := subscribeResults(t)
	disk, _ := vmdkDisk(t, "disk1.vmdk", 0x23, "0")
	for _, tc := range []struct{ name, member string }{
		{"escape", "disk1\x1b[2J\x1b[31m.vmdk"},
		{"newline", "disk1.vmdk\nlevel=INFO msg=converted"},
		{"bidi", "disk1\u202ekdmv.exe.vmdk"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := ovatest.Member{Name: tc.member, Body: disk.Body}
			key := "e2e/ova-trust/names/" + tc.name + ".ova"
			putObject(t, key, ovatest.Build(t, ovatest.Member{Name: "app.ovf", Body: ovatest.OVF()}, m), nil)
			f := awaitOVARefusal(t, res, key, "ova-member-name")
			assertNoOutputs(t, key)
			if strings.ContainsAny(f.Message, "\x1b\n\u202e") {
				t.Errorf("the failure message carries the characters themselves: %q", f.Message)
			}
		})
	}
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// `imagepipe inspect` runs the same reader as convert: each archive gets
// the verdict, and the rule, convert gives it.
func TestInspectCommandRefusesHostileOVAsByConvertsRules(t *testing.T) {
	good, _ := vmdkDisk(t, "disk1.vmdk", 0x71, "0")
	evil, _ := vmdkDisk(t, "disk1.vmdk", 0x72, "0")
	desc := ovatest.Member{Name: "app.ovf", Body: ovatest.OVF(good)}
	many := []ovatest.Member{desc, good}
	for i := 2; i <= 70; i++ {
		many = append(many, ovatest.Member{Name: fmt.Sprintf("note%02d.txt", i), Body: []byte("x")})
	}
	dir := t.TempDir()
	for _, tc := range []struct {
		name, rule string
		body       []byte
	}{
		{"good", "", ovatest.Appliance(t, []ovatest.Member{good}, nil)},
		{"sparse", "ova-sparse", ovatest.Build(t, desc, ovatest.Member{Name: "disk1.vmdk", Sparse: 1 << 50})},
		{"symlink", "ova-member", ovatest.Build(t, desc, ovatest.Member{Name: "disk1.vmdk", Type: tar.TypeSymlink, Link: "/etc/shadow"})},
		{"duplicate", "ova-duplicate-member", ovatest.Build(t, desc, good, evil)},
		{"tampered", "ova-manifest", ovatest.Appliance(t, []ovatest.Member{evil}, map[string]string{"disk1.vmdk": sha256Hex(good.Body)})},
		{"many", "ova-members", ovatest.Build(t, many...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, tc.name+".ova")
			if err := os.WriteFile(path, tc.body, 0o600); err != nil {
				t.Fatal(err)
			}
			code, stdout, stderr := cli(t, "inspect", "--json", path)
			var rep struct{ Verdict, Rule string }
			if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
				t.Fatalf("exit %d, output %q (%s): %v", code, stdout, stderr, err)
			}
			if tc.rule == "" && (code != 0 || rep.Verdict != "accepted") {
				t.Errorf("a good OVA: exit %d, %+v", code, rep)
			}
			if tc.rule != "" && (code != 1 || rep.Verdict != "refused" || rep.Rule != tc.rule) {
				t.Errorf("exit %d, %+v; want refused by rule %s", code, rep, tc.rule)
			}
		})
	}
}
