package natsrt

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/nats-io/nats.go"
)

// DefaultURL is where imagepipe looks for NATS when neither
// IMAGEPIPE_NATS_URL nor a nats context says where.
const DefaultURL = nats.DefaultURL

// natsContext is what imagepipe reads of a nats CLI context
// (`nats context save`), a JSON file in ~/.config/nats/context/NAME.json:
// where the servers are, how to sign in, and the TLS files.
type natsContext struct {
	URL      string `json:"url"`
	User     string `json:"user"`
	Password string `json:"password"`
	Creds    string `json:"creds"`
	Nkey     string `json:"nkey"`
	Cert     string `json:"cert"`
	Key      string `json:"key"`
	CA       string `json:"ca"`
	// Settings of a context that change how to connect or sign in and
	// that imagepipe does not apply: connecting without them would reach
	// a server differently from the nats CLI, so they are refused.
	Token       string `json:"token"`
	UserJWT     string `json:"user_jwt"`
	NSC         string `json:"nsc"`
	SocksProxy  string `json:"socks_proxy"`
	TLSFirst    bool   `json:"tls_first"`
	JSDomain    string `json:"jetstream_domain"`
	JSAPIPrefix string `json:"jetstream_api_prefix"`
}

// selectedContext is the nats context the nats CLI would use: the one
// NATS_CONTEXT names, or else the one `nats context select` wrote into
// nats/context.txt under XDG_CONFIG_HOME (~/.config). It returns "" when
// none is selected.
func selectedContext() (name, path string, err error) {
	dir := os.Getenv("XDG_CONFIG_HOME")
	if dir == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", "", nil // no home, so no context
		}
		dir = filepath.Join(home, ".config")
	}
	dir = filepath.Join(dir, "nats")
	name = strings.TrimSpace(os.Getenv("NATS_CONTEXT"))
	if name == "" {
		b, err := os.ReadFile(filepath.Join(dir, "context.txt"))
		if errors.Is(err, fs.ErrNotExist) {
			return "", "", nil
		}
		if err != nil {
			return "", "", fmt.Errorf("nats context: %w", err)
		}
		name = strings.TrimSpace(string(b))
	}
	if name == "" {
		return "", "", nil
	}
	if strings.ContainsAny(name, `/\`) || name == "." || name == ".." {
		return "", "", fmt.Errorf("nats context %q: want the name of a context in %s (NATS_CONTEXT, nats context select)", name, filepath.Join(dir, "context"))
	}
	return name, filepath.Join(dir, "context", name+".json"), nil
}

// loadContext reads the context at path.
func loadContext(name, path string) (natsContext, error) {
	var c natsContext
	b, err := os.ReadFile(path)
	if err != nil {
		return c, fmt.Errorf("nats context %s (NATS_CONTEXT or nats context select; set IMAGEPIPE_NATS_URL to use none): %w", name, err)
	}
	if err := json.Unmarshal(b, &c); err != nil {
		return c, fmt.Errorf("nats context %s: %s is not a nats context: %w", name, path, err)
	}
	var unused []string
	for field, set := range map[string]bool{
		"token": c.Token != "", "user_jwt": c.UserJWT != "", "nsc": c.NSC != "", "socks_proxy": c.SocksProxy != "",
		"tls_first": c.TLSFirst, "jetstream_domain": c.JSDomain != "", "jetstream_api_prefix": c.JSAPIPrefix != "",
	} {
		if set {
			unused = append(unused, field)
		}
	}
	if len(unused) > 0 {
		return c, fmt.Errorf("nats context %s sets %s, which imagepipe does not apply: use a context with url, user/password, creds, nkey, cert, key and ca only, or set IMAGEPIPE_NATS_URL and its companions instead", name, strings.Join(slices.Sorted(slices.Values(unused)), ", "))
	}
	for _, f := range []struct {
		field string
		path  *string
	}{{"creds", &c.Creds}, {"nkey", &c.Nkey}, {"cert", &c.Cert}, {"key", &c.Key}, {"ca", &c.CA}} {
		if *f.path == "" {
			continue
		}
		*f.path = expandHome(*f.path)
		// A missing file is a context to fix, not an outage to wait out.
		if _, err := os.Stat(*f.path); err != nil {
			return c, fmt.Errorf("nats context %s: its %s: %w", name, f.field, err)
		}
	}
	return c, nil
}

// effective is cfg with the selected nats context applied where
// IMAGEPIPE_NATS_URL is unset: its URL, and its sign-in and TLS files
// where the IMAGEPIPE_NATS_* ones set none. Without a context the URL is
// DefaultURL. ctxName names the context used, or is "".
func (cfg Config) effective() (out Config, ctxName string, err error) {
	if cfg.URL != "" {
		return cfg, "", nil
	}
	name, path, err := selectedContext()
	if err != nil || name == "" {
		cfg.URL = DefaultURL
		return cfg, "", err
	}
	c, err := loadContext(name, path)
	if err != nil {
		return cfg, name, err
	}
	cfg.URL = c.URL
	if cfg.URL == "" {
		cfg.URL = DefaultURL
	}
	if cfg.User == "" && cfg.Password == "" && cfg.Creds == "" && cfg.Nkey == "" {
		cfg.User, cfg.Password, cfg.Creds, cfg.Nkey = c.User, c.Password, c.Creds, c.Nkey
	}
	if cfg.CA == "" && cfg.Cert == "" && cfg.Key == "" {
		cfg.CA, cfg.Cert, cfg.Key = c.CA, c.Cert, c.Key
	}
	return cfg, name, nil
}

// Servers is where cfg connects: IMAGEPIPE_NATS_URL, or the selected nats
// context's URL, or DefaultURL.
func (cfg Config) Servers() string {
	if eff, _, err := cfg.effective(); err == nil {
		return eff.URL
	}
	if cfg.URL == "" {
		return DefaultURL
	}
	return cfg.URL
}

// servers is the connect option that dials urls, for a URL that does not
// come from IMAGEPIPE_NATS_URL (which Connect passes to nats.Connect).
func servers(urls string) nats.Option {
	return func(o *nats.Options) error {
		o.Servers = nil
		for _, u := range strings.Split(urls, ",") {
			if u = strings.TrimSpace(u); u != "" {
				o.Servers = append(o.Servers, u)
			}
		}
		return nil
	}
}

// expandHome expands a leading ~/ as the nats CLI does in a context's
// file paths.
func expandHome(p string) string {
	if rest, ok := strings.CutPrefix(p, "~/"); ok {
		if home, err := os.UserHomeDir(); err == nil {
			return filepath.Join(home, rest)
		}
	}
	return p
}
