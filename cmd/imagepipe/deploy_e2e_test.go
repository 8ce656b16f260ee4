package main

import (
	"net/url"
	"strings"
	"testing"
	"time"
)

// TestServicesRefuseToStartWithThePlaceholderSecretsOfTheExamples starts
// each function against the e2e stack, configured as a copied example
// would leave it, and shows it exits 1 before doing any work, naming the
// variable to fix and how to make a secret, without echoing the secret.
// The stack's own NATS takes any password and its MinIO is on loopback,
// so without the check each of them would start and run.
func TestServicesRefuseToStartWithThePlaceholderSecretsOfTheExamples(t *testing.T) {
	natsURL := func(user, password string) string {
		u, err := url.Parse(e2e.stack.s.NATS.URL)
		if err != nil {
			t.Fatal(err)
		}
		u.User = url.UserPassword(user, password)
		return u.String()
	}
	tests := []struct {
		name     string
		args     []string
		env      map[string]string
		variable string
		secret   string
	}{
		{
			name: "ingest with a NATS password from infra/compose", args: []string{"ingest"},
			env:      map[string]string{"IMAGEPIPE_NATS_URL": natsURL("ingest", "change-me-ingest")},
			variable: "IMAGEPIPE_NATS_URL", secret: "change-me-ingest",
		},
		{
			name: "convert with an S3 secret from infra/systemd", args: []string{"convert"},
			env:      map[string]string{"IMAGEPIPE_S3_SECRET_KEY": "change-me-convert-s3"},
			variable: "IMAGEPIPE_S3_SECRET_KEY", secret: "change-me-convert-s3",
		},
		{
			name: "ingest with MinIO's default credentials away from loopback", args: []string{"ingest"},
			env: map[string]string{
				"IMAGEPIPE_S3_ENDPOINT": "minio.example.net:9000", "IMAGEPIPE_S3_ACCESS_KEY": "minioadmin", "IMAGEPIPE_S3_SECRET_KEY": "minioadmin",
			},
			variable: "IMAGEPIPE_S3_SECRET_KEY",
		},
		{
			name: "notify with the example webhook secret", args: []string{"notify"},
			env: map[string]string{
				"IMAGEPIPE_WEBHOOK_URL": "http://127.0.0.1:9/hook", "IMAGEPIPE_WEBHOOK_SECRET": "change-me-webhook",
			},
			variable: "IMAGEPIPE_WEBHOOK_SECRET", secret: "change-me-webhook",
		},
		{
			name: "the command line with the example cli password", args: []string{"status", "uploads/disks/x.vhdx"},
			env:      map[string]string{"IMAGEPIPE_NATS_URL": natsURL("cli", "change-me-cli")},
			variable: "IMAGEPIPE_NATS_URL", secret: "change-me-cli",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stackEnv(t)
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			done := make(chan cmdResult, 1)
			go func() { done <- imagepipe(t, tt.args...) }()
			var r cmdResult
			select {
			case r = <-done:
			case <-time.After(scaled(60 * time.Second)):
				t.Fatalf("imagepipe %v started with a placeholder secret and is still running", tt.args)
			}
			if r.code != 1 || !strings.Contains(r.stderr, tt.variable) || !strings.Contains(r.stderr, "openssl rand -hex 32") {
				t.Errorf("imagepipe %v exited %d: %s\nwant 1 and a refusal naming %s and how to make a secret", tt.args, r.code, r.stderr, tt.variable)
			}
			if tt.secret != "" && strings.Contains(r.stderr, tt.secret) {
				t.Errorf("the refusal shows the secret: %s", r.stderr)
			}
		})
	}
}
