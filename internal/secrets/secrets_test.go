package secrets

import (
	"errors"
	"strings"
	"testing"
)

func TestEveryShippedPlaceholderIsRefused(t *testing.T) {
	for _, v := range []string{"change-me-admin", "change-me-convert-s3", "CHANGE-ME-webhook", " change-me ", "SECRET", "changeme", "<password>"} {
		if !IsPlaceholder(v) {
			t.Errorf("%q is not taken for a placeholder", v)
		}
		err := Check("IMAGEPIPE_WEBHOOK_SECRET", v)
		if !errors.Is(err, ErrPlaceholder) || !strings.Contains(err.Error(), "IMAGEPIPE_WEBHOOK_SECRET") || !strings.Contains(err.Error(), "openssl rand -hex 32") {
			t.Errorf("Check(%q) = %v, want a refusal naming the variable and how to make a secret", v, err)
		}
	}
	for _, v := range []string{"", "3f9c0e1d7a", "secretive-but-real-9f2", "minioadmin"} {
		if err := Check("X", v); err != nil {
			t.Errorf("Check(%q) = %v, want accepted", v, err)
		}
	}
}

func TestPlaceholderNATSPasswordsAreRefusedWithoutShowingThem(t *testing.T) {
	tests := []struct {
		list    string
		refused bool
	}{
		{"nats://127.0.0.1:4222", false},
		{"nats://ingest:4c1f9e@nats-1:4222,nats://ingest:4c1f9e@nats-2:4222", false},
		{"nats://ingest:4c1f9e@nats-1:4222,nats://ingest:change-me-ingest@nats-2:4222", true},
		{"tls://change-me-token@nats-1:4222", true},
		{"nats://admin:SECRET@nats-1:4222", true},
	}
	for _, tt := range tests {
		err := CheckURLs("IMAGEPIPE_NATS_URL", tt.list)
		if (err != nil) != tt.refused {
			t.Errorf("CheckURLs(%q) = %v, want refused %v", tt.list, err, tt.refused)
			continue
		}
		if err != nil && (strings.Contains(err.Error(), "change-me-ingest") || !strings.Contains(err.Error(), "IMAGEPIPE_NATS_URL")) {
			t.Errorf("refusal %q shows the password or omits the variable", err)
		}
	}
}

func TestMinIODefaultCredentialsAreRefusedAwayFromLoopback(t *testing.T) {
	tests := []struct {
		endpoint, access, secret string
		refused                  bool
	}{
		{"127.0.0.1:9000", "minioadmin", "minioadmin", false},
		{"localhost:9000", "minioadmin", "minioadmin", false},
		{"[::1]:9000", "minioadmin", "minioadmin", false},
		{"minio:9000", "minioadmin", "minioadmin", true},
		{"0.0.0.0:9000", "minioadmin", "minioadmin", true},
		{"10.0.0.5:9000", "imagepipe-convert", "minioadmin", true},
		{"s3.example.net", "minioadmin", "x7f3a9", true},
		{"minio:9000", "imagepipe-convert", "9c4b1e77", false},
		{"127.0.0.1:9000", "imagepipe-convert", "change-me-convert-s3", true},
	}
	for _, tt := range tests {
		err := CheckS3(tt.endpoint, tt.access, tt.secret)
		if (err != nil) != tt.refused || (err != nil && !errors.Is(err, ErrPlaceholder)) {
			t.Errorf("CheckS3(%s, %s, %s) = %v, want refused %v", tt.endpoint, tt.access, tt.secret, err, tt.refused)
		}
	}
}
