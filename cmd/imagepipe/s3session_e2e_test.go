package main

import (
	"context"
	"testing"
	"time"

	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/imagepipe/imagepipe/internal/objstore"
)

// TestS3SessionTokenSignsInWithTemporaryKeys asks the stack's MinIO for
// temporary keys (STS AssumeRole), configures them as an operator would,
// and reads the input bucket with them: the session token from
// IMAGEPIPE_S3_SESSION_TOKEN is what makes them valid.
func TestS3SessionTokenSignsInWithTemporaryKeys(t *testing.T) {
	root := e2e.stack.s.S3
	sts, err := credentials.NewSTSAssumeRole("http://"+root.Endpoint, credentials.STSAssumeRoleOptions{
		AccessKey: root.AccessKey, SecretKey: root.SecretKey, DurationSeconds: 900,
	})
	if err != nil {
		t.Fatal(err)
	}
	tmp, err := sts.GetWithContext(&credentials.CredContext{})
	if err != nil {
		t.Fatalf("STS AssumeRole: %v", err)
	}
	if tmp.SessionToken == "" {
		t.Fatal("MinIO gave temporary keys without a session token")
	}
	cleanConfig(t)
	t.Setenv("IMAGEPIPE_S3_ENDPOINT", root.Endpoint)
	t.Setenv("IMAGEPIPE_S3_ACCESS_KEY", tmp.AccessKeyID)
	t.Setenv("IMAGEPIPE_S3_SECRET_KEY", tmp.SecretAccessKey)
	t.Setenv("IMAGEPIPE_S3_SESSION_TOKEN", tmp.SessionToken)

	bucketExists := func() (bool, error) {
		s, err := loadSettings()
		if err != nil {
			t.Fatal(err)
		}
		store, err := objstore.New(s.S3)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), scaled(time.Minute))
		defer cancel()
		return store.Client().BucketExists(ctx, "uploads")
	}
	if ok, err := bucketExists(); err != nil || !ok {
		t.Fatalf("with the session token: exists %v, %v", ok, err)
	}
	t.Setenv("IMAGEPIPE_S3_SESSION_TOKEN", "")
	if _, err := bucketExists(); err == nil {
		t.Fatal("temporary keys worked without their session token: the token is not what signs in")
	}
}
