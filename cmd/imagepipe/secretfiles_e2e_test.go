package main

import (
	"os"
	"path/filepath"
	"testing"
)

// secretFiles writes the S3 keys as a mounted Kubernetes Secret holds
// them and points the _FILE variables at them, with the plain variables
// empty, as deploy/kubernetes configures every pod.
func secretFiles(t *testing.T, access, secret string) {
	t.Helper()
	dir := t.TempDir()
	for name, v := range map[string]string{"s3-access-key": access, "s3-secret-key": secret} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(v+"\n"), 0o400); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("IMAGEPIPE_S3_ACCESS_KEY", "")
	t.Setenv("IMAGEPIPE_S3_SECRET_KEY", "")
	t.Setenv("IMAGEPIPE_S3_ACCESS_KEY_FILE", filepath.Join(dir, "s3-access-key"))
	t.Setenv("IMAGEPIPE_S3_SECRET_KEY_FILE", filepath.Join(dir, "s3-secret-key"))
}

// TestS3KeysFromSecretFilesUploadAndConvert uploads with the keys read
// from files only: the object lands byte for byte and is converted; the
// same upload with a wrong key in the file is refused and stores nothing.
func TestS3KeysFromSecretFilesUploadAndConvert(t *testing.T) {
	s := e2e.stack.s
	img := makeImage(t, t.TempDir(), "disk.qcow2", "qcow2", "write -P 0x5a 0 1M")
	want, wantSize := localRaw(t, img, "qcow2")

	stackEnv(t)
	secretFiles(t, s.S3.AccessKey, s.S3.SecretKey)
	key := "secret-files/disk.qcow2"
	if r := imagepipe(t, "upload", "--json", img, "uploads/"+key); r.code != 0 {
		t.Fatalf("upload with keys from files exited %d: %s", r.code, r.stderr)
	}
	if got, _ := downloadSum(t, "uploads", key); got != fileSum(t, img) {
		t.Errorf("uploaded object differs from the file")
	}
	if got, size := downloadSum(t, "images", key+".raw"); got != want || size != wantSize {
		t.Errorf("output %s (%d bytes), want qemu-img's %s (%d bytes)", got, size, want, wantSize)
	}

	secretFiles(t, s.S3.AccessKey, "not-"+s.S3.SecretKey)
	wrong := "secret-files/wrong-key.qcow2"
	if r := imagepipe(t, "upload", "--no-wait", img, "uploads/"+wrong); r.code == 0 {
		t.Fatal("an upload with a wrong secret key in the file succeeded: the file is not what is used")
	}
	if objectExists(t, "uploads", wrong) {
		t.Error("the refused upload stored an object")
	}
}
