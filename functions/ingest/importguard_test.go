package ingest

import (
	"errors"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caarlos0/env/v11"

	"github.com/imagepipe/imagepipe/events"
)

func TestAddressKindRefusesEveryNonGlobalAddress(t *testing.T) {
	tests := []struct {
		ip   string
		kind string // "" for a global address
	}{
		{"127.0.0.1", "loopback"},
		{"127.255.255.254", "loopback"},
		{"10.1.2.3", "private"},
		{"172.16.0.1", "private"},
		{"172.31.255.255", "private"},
		{"192.168.1.1", "private"},
		{"100.64.0.1", "shared (carrier-grade NAT)"},
		{"100.127.255.255", "shared (carrier-grade NAT)"},
		{"169.254.169.254", "link-local (where cloud metadata services answer)"},
		{"0.0.0.0", "unspecified (this network)"},
		{"0.1.2.3", "unspecified (this network)"},
		{"224.0.0.1", "multicast"},
		{"239.255.255.250", "multicast"},
		{"255.255.255.255", "reserved or broadcast"},
		{"192.0.2.10", "documentation"},
		{"198.18.0.1", "benchmarking"},
		{"::1", "loopback"},
		{"::", "unspecified"},
		{"fe80::1", "link-local"},
		{"fe80::1%eth0", "link-local"},
		{"fc00::1", "unique-local"},
		{"fd12:3456::1", "unique-local"},
		{"ff02::1", "multicast"},
		{"ff05::2", "multicast"},
		{"fec0::1", "site-local"},
		{"2001:db8::1", "documentation"},
		{"2001::1", "reserved for protocol assignments"}, // Teredo
		{"::127.0.0.1", "IPv4-compatible"},
		{"::8.8.8.8", "IPv4-compatible"},
		// IPv4-mapped forms are the IPv4 address.
		{"::ffff:127.0.0.1", "loopback"},
		{"::ffff:7f00:1", "loopback"},
		{"::ffff:169.254.169.254", "link-local (where cloud metadata services answer)"},
		{"::ffff:10.0.0.1", "private"},
		{"::ffff:0.0.0.0", "unspecified (this network)"},
		// NAT64 and 6to4 deliver to the IPv4 address they embed.
		{"64:ff9b::7f00:1", "loopback, embedded in an IPv6 address"},
		{"64:ff9b::a9fe:a9fe", "link-local (where cloud metadata services answer), embedded in an IPv6 address"},
		{"2002:7f00:1::1", "loopback, embedded in an IPv6 address"},
		{"2002:c0a8:101::1", "private, embedded in an IPv6 address"},
		{"64:ff9b:1::1", "local-use NAT64"},
		// Global ones, including the edges of the blocks above.
		{"8.8.8.8", ""},
		{"1.1.1.1", ""},
		{"172.32.0.1", ""},
		{"100.128.0.1", ""},
		{"169.255.0.1", ""},
		{"11.0.0.1", ""},
		{"::ffff:8.8.8.8", ""},
		{"2606:4700:4700::1111", ""},
		{"64:ff9b::808:808", ""},
		{"2002:808:808::1", ""},
	}
	for _, tt := range tests {
		ip := netip.MustParseAddr(tt.ip)
		got := addressKind(ip)
		if got != tt.kind {
			t.Errorf("addressKind(%s) = %q, want %q", tt.ip, got, tt.kind)
		}
	}
}

func TestAddressRuleAdmitsOnlyWhatTheOperatorAllows(t *testing.T) {
	rules := newImportRules(Config{
		ImportAllowedNetworks:    []netip.Prefix{netip.MustParsePrefix("10.20.0.0/16"), netip.MustParsePrefix("::1/128")},
		ImportDisallowedNetworks: []netip.Prefix{netip.MustParsePrefix("10.20.30.0/24"), netip.MustParsePrefix("203.0.0.0/8")},
	})
	tests := []struct {
		ip      string
		refused bool
	}{
		{"10.20.1.1", false},        // allowed network
		{"::ffff:10.20.1.1", false}, // its mapped form too
		{"10.20.30.4", true},        // disallowed wins over allowed
		{"10.21.0.1", true},         // private, not allowed
		{"::1", false},
		{"127.0.0.1", true}, // ::1 allowed says nothing of 127.0.0.1
		{"203.5.5.5", true}, // global, but disallowed
		{"8.8.8.8", false},
	}
	for _, tt := range tests {
		err := rules.checkAddr(netip.MustParseAddr(tt.ip))
		if tt.refused != (err != nil) {
			t.Errorf("checkAddr(%s) = %v, want refused %v", tt.ip, err, tt.refused)
		}
		if err != nil && ruleOf(err) != events.RuleImportAddress {
			t.Errorf("checkAddr(%s) rule %q", tt.ip, ruleOf(err))
		}
	}
}

func TestDialControlJudgesTheAddressAndPortDialled(t *testing.T) {
	rules := newImportRules(Config{})
	tests := []struct {
		addr string
		rule string
	}{
		{"127.0.0.1:80", events.RuleImportAddress},
		{"[::1]:443", events.RuleImportAddress},
		{"[::ffff:127.0.0.1]:80", events.RuleImportAddress},
		{"169.254.169.254:80", events.RuleImportAddress},
		{"[fe80::1%eth0]:443", events.RuleImportAddress},
		{"8.8.8.8:22", events.RuleImportPort},
		{"not an address", events.RuleImportAddress},
		{"8.8.8.8:443", ""},
		{"[2606:4700:4700::1111]:80", ""},
	}
	for _, tt := range tests {
		err := rules.control("tcp", tt.addr, nil)
		if ruleOf(err) != tt.rule {
			t.Errorf("control(%s) = %v, want rule %q", tt.addr, err, tt.rule)
		}
		if err != nil && !strings.Contains(err.Error(), "refused by rule "+tt.rule) {
			t.Errorf("control(%s) error %q does not name its rule", tt.addr, err)
		}
	}
}

func TestURLRulesFollowGlanceFiltering(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		url  string
		rule string
	}{
		{"default http", Config{}, "http://example.com/a.qcow2", ""},
		{"default https", Config{}, "https://example.com/a.qcow2", ""},
		{"explicit default port", Config{}, "http://example.com:80/a.qcow2", ""},
		{"other port refused by default", Config{}, "http://example.com:8080/a.qcow2", events.RuleImportPort},
		{"https on port 80", Config{}, "https://example.com:80/a.qcow2", ""},
		{"port 0", Config{}, "http://example.com:0/a.qcow2", events.RuleImportPort},
		{"ftp never", Config{ImportAllowedSchemes: []string{"ftp", "http"}}, "ftp://example.com/a.qcow2", events.RuleImportScheme},
		{"file never", Config{}, "file:///etc/passwd", events.RuleImportScheme},
		{"scheme not allowed", Config{ImportAllowedSchemes: []string{"https"}}, "http://example.com/a.qcow2", events.RuleImportScheme},
		{"scheme case", Config{ImportAllowedSchemes: []string{"HTTPS"}}, "HTTPS://example.com/a.qcow2", ""},
		{"scheme disallowed", Config{ImportDisallowedSchemes: []string{"http"}}, "http://example.com/a.qcow2", events.RuleImportScheme},
		{"host allowed", Config{ImportAllowedHosts: []string{"images.example.com"}}, "https://Images.Example.com./a.qcow2", ""},
		{"host not allowed", Config{ImportAllowedHosts: []string{"images.example.com"}}, "https://example.com/a.qcow2", events.RuleImportHost},
		{"host suffix", Config{ImportAllowedHosts: []string{".example.com"}}, "https://cdn.eu.example.com/a.qcow2", ""},
		{"suffix is not the domain", Config{ImportAllowedHosts: []string{".example.com"}}, "https://badexample.com/a.qcow2", events.RuleImportHost},
		{"host disallowed", Config{ImportDisallowedHosts: []string{"metadata.google.internal"}}, "http://metadata.google.internal/a.qcow2", events.RuleImportHost},
		{"disallowed wins over allowed", Config{ImportAllowedHosts: []string{".example.com"}, ImportDisallowedHosts: []string{"minio.example.com"}}, "https://minio.example.com/a.qcow2", events.RuleImportHost},
		{"ip host spelled otherwise", Config{ImportDisallowedHosts: []string{"::ffff:8.8.8.8"}}, "http://8.8.8.8/a.qcow2", events.RuleImportHost},
		{"bracketed host entry", Config{ImportDisallowedHosts: []string{"[2001:4860::8888]"}}, "http://[2001:4860:0::8888]/a.qcow2", events.RuleImportHost},
		{"port allowed", Config{ImportAllowedPorts: []PortRange{{8000, 8099}}}, "http://example.com:8080/a.qcow2", ""},
		{"default port not in list", Config{ImportAllowedPorts: []PortRange{{8000, 8099}}}, "http://example.com/a.qcow2", events.RuleImportPort},
		{"port disallowed under *", Config{ImportAllowedPorts: []PortRange{{1, 65535}}, ImportDisallowedPorts: []PortRange{{22, 22}}}, "http://example.com:22/a.qcow2", events.RuleImportPort},
		{"port disallowed beats allowed", Config{ImportDisallowedPorts: []PortRange{{443, 443}}}, "https://example.com/a.qcow2", events.RuleImportPort},
	}
	for _, tt := range tests {
		u, err := url.Parse(tt.url)
		if err != nil {
			t.Fatal(err)
		}
		if got := ruleOf(newImportRules(tt.cfg).checkURL(u)); got != tt.rule {
			t.Errorf("%s: checkURL(%s) rule %q, want %q", tt.name, tt.url, got, tt.rule)
		}
	}
}

func TestRedirectsAreCountedAndEachHopChecked(t *testing.T) {
	rules := newImportRules(Config{ImportMaxRedirects: 2, ImportAllowedHosts: []string{".example.com"}})
	hop := func(s string) *http.Request {
		r, err := http.NewRequest(http.MethodGet, s, nil)
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	https, http1 := hop("https://a.example.com/x.qcow2"), hop("http://a.example.com/x.qcow2")
	tests := []struct {
		name string
		next string
		via  []*http.Request
		rule string
	}{
		{"first redirect", "https://b.example.com/x.qcow2", []*http.Request{https}, ""},
		{"at the limit", "https://b.example.com/x.qcow2", []*http.Request{https, https}, ""},
		{"over the limit", "https://b.example.com/x.qcow2", []*http.Request{https, https, https}, events.RuleImportRedirects},
		{"https to http", "http://b.example.com/x.qcow2", []*http.Request{https}, events.RuleImportRedirects},
		{"http to https", "https://b.example.com/x.qcow2", []*http.Request{http1}, ""},
		{"to a host not allowed", "https://evil.test/x.qcow2", []*http.Request{https}, events.RuleImportHost},
		{"to a port not allowed", "https://b.example.com:22/x.qcow2", []*http.Request{https}, events.RuleImportPort},
		{"to another scheme", "ftp://b.example.com/x.qcow2", []*http.Request{http1}, events.RuleImportScheme},
	}
	for _, tt := range tests {
		next := &http.Request{URL: mustURL(t, tt.next)}
		if got := ruleOf(rules.checkRedirect(next, tt.via)); got != tt.rule {
			t.Errorf("%s: rule %q, want %q", tt.name, got, tt.rule)
		}
	}
	if ruleOf(newImportRules(Config{}).checkRedirect(hop("https://b.example.com/"), []*http.Request{https})) != events.RuleImportRedirects {
		t.Error("a Config built in code follows redirects; 0 must follow none")
	}
}

func TestImportSettingsParseFromTheEnvironment(t *testing.T) {
	var def Config
	if err := env.ParseWithOptions(&def, env.Options{Environment: map[string]string{}}); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(def.ImportAllowedSchemes, []string{"http", "https"}) || !slices.Equal(def.ImportAllowedPorts, DefaultImportPorts) ||
		def.ImportMaxRedirects != 5 || def.ImportTimeout != 6*time.Hour || def.ImportIdleTimeout != 2*time.Minute ||
		def.ImportMaxConcurrent != 4 || def.ImportAllowedNetworks != nil || def.ImportProxy != nil {
		t.Errorf("defaults = %+v", def)
	}
	var c Config
	err := env.ParseWithOptions(&c, env.Options{Environment: map[string]string{
		"IMAGEPIPE_IMPORT_ALLOWED_NETWORKS":   "127.0.0.0/8,::1/128",
		"IMAGEPIPE_IMPORT_ALLOWED_PORTS":      "*",
		"IMAGEPIPE_IMPORT_DISALLOWED_PORTS":   "22,6000-6010",
		"IMAGEPIPE_IMPORT_PROXY":              "http://proxy.internal:3128",
		"IMAGEPIPE_IMPORT_DISALLOWED_HOSTS":   "metadata.google.internal",
		"IMAGEPIPE_IMPORT_MAX_CONCURRENT":     "2",
		"IMAGEPIPE_IMPORT_IDLE_TIMEOUT":       "30s",
		"IMAGEPIPE_IMPORT_ALLOWED_SCHEMES":    "https",
		"IMAGEPIPE_IMPORT_MAX_REDIRECTS":      "0",
		"IMAGEPIPE_IMPORT_DISALLOWED_SCHEMES": "",
	}})
	if err != nil {
		t.Fatal(err)
	}
	if len(c.ImportAllowedNetworks) != 2 || !slices.Equal(c.ImportAllowedPorts, []PortRange{{1, 65535}}) ||
		!slices.Equal(c.ImportDisallowedPorts, []PortRange{{22, 22}, {6000, 6010}}) || c.ImportProxy.Host != "proxy.internal:3128" ||
		c.ImportMaxConcurrent != 2 || c.ImportIdleTimeout != 30*time.Second || c.ImportMaxRedirects != 0 {
		t.Errorf("parsed = %+v", c)
	}
	for _, bad := range []map[string]string{
		{"IMAGEPIPE_IMPORT_ALLOWED_NETWORKS": "127.0.0.1"},
		{"IMAGEPIPE_IMPORT_ALLOWED_PORTS": "0"},
		{"IMAGEPIPE_IMPORT_ALLOWED_PORTS": "90-80"},
		{"IMAGEPIPE_IMPORT_ALLOWED_PORTS": "65536"},
		{"IMAGEPIPE_IMPORT_DISALLOWED_PORTS": "ssh"},
	} {
		var c Config
		if err := env.ParseWithOptions(&c, env.Options{Environment: bad}); err == nil {
			t.Errorf("%v parsed; want an error at start-up", bad)
		}
	}
}

func ruleOf(err error) string {
	var ref *importRefusal
	if errors.As(err, &ref) {
		return ref.Rule
	}
	if err != nil {
		return "not a refusal: " + err.Error()
	}
	return ""
}

func mustURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}
