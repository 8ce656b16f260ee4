package objstore

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/caarlos0/env/v11"

	"github.com/imagepipe/imagepipe/test/stack"
)

// keyFiles writes the keys as a mounted Kubernetes Secret holds them
// (a trailing newline included) and parses the settings as every
// command does, with only the _FILE variables set.
func keyFiles(t *testing.T, access, secret string) Config {
	t.Helper()
	dir := t.TempDir()
	for name, v := range map[string]string{"access-key": access, "secret-key": secret} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(v+"\n"), 0o400); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("IMAGEPIPE_S3_ENDPOINT", testStore.Client().EndpointURL().Host)
	t.Setenv("IMAGEPIPE_S3_ACCESS_KEY", "")
	t.Setenv("IMAGEPIPE_S3_SECRET_KEY", "")
	t.Setenv("IMAGEPIPE_S3_ACCESS_KEY_FILE", filepath.Join(dir, "access-key"))
	t.Setenv("IMAGEPIPE_S3_SECRET_KEY_FILE", filepath.Join(dir, "secret-key"))
	cfg, err := env.ParseAs[Config]()
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestS3KeysFromFilesSignIn(t *testing.T) {
	s, err := New(keyFiles(t, stack.AccessKey, stack.SecretKey))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Client().ListBuckets(context.Background()); err != nil {
		t.Fatalf("list buckets with keys from files: %v", err)
	}

	wrong, err := New(keyFiles(t, stack.AccessKey, "not-the-secret"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := wrong.Client().ListBuckets(context.Background()); err == nil {
		t.Fatal("a wrong secret key file signed in: the file is not what is used")
	}
}

func TestS3KeyFileThatIsMissingFailsTheStart(t *testing.T) {
	t.Setenv("IMAGEPIPE_S3_SECRET_KEY_FILE", filepath.Join(t.TempDir(), "absent"))
	if _, err := env.ParseAs[Config](); err == nil {
		t.Fatal("a missing IMAGEPIPE_S3_SECRET_KEY_FILE was accepted")
	}
}
