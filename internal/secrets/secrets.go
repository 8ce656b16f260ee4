package secrets

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
)

// ErrPlaceholder is what every refusal here wraps, so that callers and
// tests can tell a placeholder from a wrong setting with errors.Is.
var ErrPlaceholder = errors.New("a placeholder secret from the examples")

// placeholderPrefix starts every secret infra/ ships: change-me-admin,
// change-me-convert-s3, change-me-webhook, ...
const placeholderPrefix = "change-me"

// placeholders are the other stand-ins the README and examples show in
// place of a secret, compared without regard to case.
var placeholders = []string{"changeme", "secret", "<secret>", "password", "<password>"}

// MinIODefault is MinIO's built-in root user and password. `imagepipe dev`
// uses it for the MinIO it runs on 127.0.0.1; anywhere else it is refused.
const MinIODefault = "minioadmin"

// Generate is the advice every refusal gives.
const Generate = "generate one with `openssl rand -hex 32`"

// IsPlaceholder reports whether v is one of the secrets the examples ship.
func IsPlaceholder(v string) bool {
	v = strings.ToLower(strings.TrimSpace(v))
	if strings.HasPrefix(v, placeholderPrefix) {
		return true
	}
	for _, p := range placeholders {
		if v == p {
			return true
		}
	}
	return false
}

// Check refuses value when it is a placeholder, naming variable. An empty
// value is not checked: whether a secret is required is the caller's call.
// The value itself never appears in the error.
func Check(variable, value string) error {
	if value == "" || !IsPlaceholder(value) {
		return nil
	}
	return fmt.Errorf("%s is %w: set a secret of your own there (%s) and the same one where the server keeps it", variable, ErrPlaceholder, Generate)
}

// CheckURLs refuses a comma-separated list of URLs (IMAGEPIPE_NATS_URL)
// when any of them carries a placeholder password, or a placeholder token
// in place of a user name.
func CheckURLs(variable, list string) error {
	for _, raw := range strings.Split(list, ",") {
		u, err := url.Parse(strings.TrimSpace(raw))
		if err != nil || u.User == nil {
			continue // not ours to judge; the client says what is wrong
		}
		secret, hasPassword := u.User.Password()
		if !hasPassword {
			secret = u.User.Username() // nats://TOKEN@host
		}
		if IsPlaceholder(secret) {
			return fmt.Errorf("%s holds a password that is %w (in %s): set a secret of your own (%s) in the server's accounts and in this URL", variable, ErrPlaceholder, u.Redacted(), Generate)
		}
	}
	return nil
}

// CheckS3 refuses placeholder S3 credentials, and MinIO's default ones
// unless the endpoint is on loopback, where only `imagepipe dev` or a test
// puts a MinIO that uses them.
func CheckS3(endpoint, accessKey, secretKey string) error {
	if err := Check("IMAGEPIPE_S3_SECRET_KEY", secretKey); err != nil {
		return err
	}
	if secretKey != MinIODefault && accessKey != MinIODefault {
		return nil
	}
	if Loopback(endpoint) {
		return nil
	}
	return fmt.Errorf("IMAGEPIPE_S3_ACCESS_KEY and IMAGEPIPE_S3_SECRET_KEY are MinIO's default %q, %w, and %s is not on loopback: "+
		"create a user for this function (infra/minio/create-users.sh) with a secret of its own (%s)",
		MinIODefault, ErrPlaceholder, endpoint, Generate)
}

// Loopback reports whether a host:port (or bare host) names this machine
// only: localhost, 127.0.0.0/8 or ::1.
func Loopback(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(strings.Trim(host, "[]"))
	return ip != nil && ip.IsLoopback()
}
