package main

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// noImagepipeKeys leaves imagepipe without S3 keys of its own, and the
// AWS credential chain without any source but the ones a test sets.
func noImagepipeKeys(t *testing.T) {
	t.Helper()
	for _, k := range []string{
		"IMAGEPIPE_S3_ACCESS_KEY", "IMAGEPIPE_S3_SECRET_KEY", "IMAGEPIPE_S3_ACCESS_KEY_FILE", "IMAGEPIPE_S3_SECRET_KEY_FILE",
		"IMAGEPIPE_S3_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SECRET_KEY",
		"AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE", "AWS_PROFILE", "AWS_CONFIG_FILE",
	} {
		t.Setenv(k, "")
		os.Unsetenv(k)
	}
	// An empty home: no ~/.aws/credentials but the one a test writes.
	t.Setenv("HOME", t.TempDir())
	// Neither an instance role: the chain's last link must not answer.
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
}

// awsCredentialsFile writes ~/.aws/credentials as the aws CLI does, with
// the keys under profile.
func awsCredentialsFile(t *testing.T, profile, access, secret string) {
	t.Helper()
	dir := filepath.Join(os.Getenv("HOME"), ".aws")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	body := fmt.Sprintf("[%s]\naws_access_key_id = %s\naws_secret_access_key = %s\n", profile, access, secret)
	if err := os.WriteFile(filepath.Join(dir, "credentials"), []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
}

// uploadSignsIn uploads img with the settings in the environment and says
// whether the object landed, byte for byte.
func uploadSignsIn(t *testing.T, img, key string) bool {
	t.Helper()
	r := imagepipe(t, "upload", "--no-wait", img, "uploads/"+key)
	if r.code != 0 {
		t.Logf("upload exited %d: %s", r.code, r.stderr)
		return false
	}
	got, _ := downloadSum(t, "uploads", key)
	if got != fileSum(t, img) {
		t.Fatalf("uploaded object %s differs from the file", key)
	}
	return true
}

// TestWithoutS3KeysTheAWSCredentialChainSignsIn runs with no
// IMAGEPIPE_S3_* key at all: the configuration is valid, and the keys come
// from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or else from
// ~/.aws/credentials (AWS_PROFILE choosing the profile). A wrong key from
// either source is refused, so it is that source that signs.
func TestWithoutS3KeysTheAWSCredentialChainSignsIn(t *testing.T) {
	s := e2e.stack.s
	img := makeImage(t, t.TempDir(), "disk.qcow2", "qcow2", "write -P 0x3c 0 1M")
	prefix := fmt.Sprintf("aws-chain-%d", os.Getpid())

	t.Run("environment", func(t *testing.T) {
		stackEnv(t)
		noImagepipeKeys(t)
		for _, fn := range []string{"ingest", "convert"} {
			if _, err := loadFunctionSettings(fn); err != nil {
				t.Fatalf("%s without S3 keys: %v, want the AWS credential chain accepted", fn, err)
			}
		}
		t.Setenv("AWS_ACCESS_KEY_ID", s.S3.AccessKey)
		t.Setenv("AWS_SECRET_ACCESS_KEY", s.S3.SecretKey)
		if !uploadSignsIn(t, img, prefix+"/env.qcow2") {
			t.Fatal("the keys in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY did not sign in")
		}
		t.Setenv("AWS_SECRET_ACCESS_KEY", "not-"+s.S3.SecretKey)
		if uploadSignsIn(t, img, prefix+"/env-wrong.qcow2") {
			t.Fatal("a wrong AWS_SECRET_ACCESS_KEY signed in: it is not what is used")
		}
	})

	t.Run("credentials file", func(t *testing.T) {
		stackEnv(t)
		noImagepipeKeys(t)
		t.Setenv("AWS_PROFILE", "imagepipe")
		awsCredentialsFile(t, "imagepipe", s.S3.AccessKey, s.S3.SecretKey)
		if !uploadSignsIn(t, img, prefix+"/file.qcow2") {
			t.Fatal("the keys in ~/.aws/credentials did not sign in")
		}
		awsCredentialsFile(t, "imagepipe", s.S3.AccessKey, "not-"+s.S3.SecretKey)
		if uploadSignsIn(t, img, prefix+"/file-wrong.qcow2") {
			t.Fatal("a wrong key in ~/.aws/credentials signed in: the file is not what is used")
		}
	})
}
