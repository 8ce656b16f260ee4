package ingest

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/imagepipe/imagepipe/events"
)

// Each URL, every redirect hop and every address actually dialled is held
// to the same import rules (events.RuleImport*, named in the refusal's
// error or failure event): a check of the first URL alone is what a
// redirect or a DNS answer walks around.

// Defaults of the import settings, for a Config built in code rather than
// parsed from the environment.
var (
	DefaultImportSchemes       = []string{"http", "https"}
	DefaultImportPorts         = []PortRange{{80, 80}, {443, 443}}
	DefaultImportTimeout       = 6 * time.Hour
	DefaultImportIdleTimeout   = 2 * time.Minute
	DefaultImportMaxConcurrent = 4
)

// supportedSchemes are the only schemes the HTTP client can fetch; an
// allow-list naming others cannot make them work.
var supportedSchemes = []string{"http", "https"}

// PortRange is one entry of a port list setting: a port ("443"), a range
// ("8000-8099"), or "*" for every port.
type PortRange struct{ Lo, Hi uint16 }

// UnmarshalText parses an entry of IMAGEPIPE_IMPORT_ALLOWED_PORTS or
// IMAGEPIPE_IMPORT_DISALLOWED_PORTS.
func (p *PortRange) UnmarshalText(b []byte) error {
	s := strings.TrimSpace(string(b))
	if s == "*" {
		*p = PortRange{1, 65535}
		return nil
	}
	lo, hi, isRange := strings.Cut(s, "-")
	if !isRange {
		hi = lo
	}
	l, errL := strconv.ParseUint(strings.TrimSpace(lo), 10, 16)
	h, errH := strconv.ParseUint(strings.TrimSpace(hi), 10, 16)
	if errL != nil || errH != nil || l == 0 || l > h {
		return fmt.Errorf("%q is not a port, a range LOW-HIGH of ports 1 to 65535, or *", s)
	}
	*p = PortRange{uint16(l), uint16(h)}
	return nil
}

func (p PortRange) contains(port uint16) bool { return p.Lo <= port && port <= p.Hi }

// importRefusal is a URL, redirect or address an import rule refuses. It
// says which rule and why in words; it never carries a connection error,
// whose kind (refused, reset, timed out) would tell the asker whether a
// port is open.
type importRefusal struct {
	Rule       string
	Reason     string
	Suggestion string
	addr       string // the address dialled, for the log only
}

func refusal(rule, reason, suggestion string) *importRefusal {
	return &importRefusal{Rule: rule, Reason: reason, Suggestion: suggestion}
}

func (r *importRefusal) Error() string { return "refused by rule " + r.Rule + ": " + r.Reason }

// nonGlobal lists the address blocks an import never reaches unless an
// operator allows them by network: IANA's special-purpose registries, the
// blocks whose "globally reachable" is false or whose use is local.
// Checked in order, the first match names the kind.
var nonGlobal = func() []struct {
	prefix netip.Prefix
	kind   string
} {
	blocks := []struct{ cidr, kind string }{
		{"0.0.0.0/8", "unspecified (this network)"},
		{"10.0.0.0/8", "private"},
		{"100.64.0.0/10", "shared (carrier-grade NAT)"},
		{"127.0.0.0/8", "loopback"},
		{"169.254.0.0/16", "link-local (where cloud metadata services answer)"},
		{"172.16.0.0/12", "private"},
		{"192.0.0.0/24", "reserved for protocol assignments"},
		{"192.0.2.0/24", "documentation"},
		{"192.88.99.0/24", "6to4 relay"},
		{"192.168.0.0/16", "private"},
		{"198.18.0.0/15", "benchmarking"},
		{"198.51.100.0/24", "documentation"},
		{"203.0.113.0/24", "documentation"},
		{"224.0.0.0/4", "multicast"},
		{"240.0.0.0/4", "reserved or broadcast"},
		{"::/128", "unspecified"},
		{"::1/128", "loopback"},
		// Deprecated IPv4-compatible and SIIT-translated forms reach
		// IPv4 hosts by other routes.
		{"::/96", "IPv4-compatible"},
		{"::ffff:0:0:0/96", "IPv4-translated"},
		{"64:ff9b:1::/48", "local-use NAT64"},
		{"100::/64", "discard-only"},
		// Teredo (2001::/32) among them: it tunnels to an IPv4 host.
		{"2001::/23", "reserved for protocol assignments"},
		{"2001:db8::/32", "documentation"},
		{"3fff::/20", "documentation"},
		{"5f00::/16", "segment routing"},
		{"fc00::/7", "unique-local"},
		{"fe80::/10", "link-local"},
		{"fec0::/10", "site-local"},
		{"ff00::/8", "multicast"},
	}
	out := make([]struct {
		prefix netip.Prefix
		kind   string
	}, len(blocks))
	for i, b := range blocks {
		out[i].prefix, out[i].kind = netip.MustParsePrefix(b.cidr), b.kind
	}
	return out
}()

var (
	nat64WellKnown = netip.MustParsePrefix("64:ff9b::/96")
	sixToFour      = netip.MustParsePrefix("2002::/16")
)

// addressKind says what kind of non-global address ip is, or "" when it
// is a global one. IPv4-mapped IPv6 addresses (::ffff:127.0.0.1) are judged
// as the IPv4 address they are, and so are the IPv4 addresses that NAT64
// and 6to4 embed: a gateway would deliver to them.
func addressKind(ip netip.Addr) string {
	// A zone (fe80::1%eth0) makes Prefix.Contains answer false.
	ip = ip.WithZone("").Unmap()
	if v4, ok := embeddedIPv4(ip); ok {
		if kind := addressKind(v4); kind != "" {
			return kind + ", embedded in an IPv6 address"
		}
	}
	for _, b := range nonGlobal {
		if b.prefix.Contains(ip) {
			return b.kind
		}
	}
	if !ip.IsValid() {
		return "invalid"
	}
	return ""
}

func embeddedIPv4(ip netip.Addr) (netip.Addr, bool) {
	b := ip.As16()
	switch {
	case !ip.Is6():
		return netip.Addr{}, false
	case nat64WellKnown.Contains(ip):
		return netip.AddrFrom4([4]byte(b[12:16])), true
	case sixToFour.Contains(ip):
		return netip.AddrFrom4([4]byte(b[2:6])), true
	}
	return netip.Addr{}, false
}

// importRules are the checks of one handler's imports, made once from its
// Config.
type importRules struct {
	allowedSchemes, disallowedSchemes   []string
	allowedHosts, disallowedHosts       []string
	allowedPorts, disallowedPorts       []PortRange
	allowedNetworks, disallowedNetworks []netip.Prefix
	maxRedirects                        int
	proxy                               *url.URL
}

func newImportRules(c Config) importRules {
	r := importRules{
		allowedSchemes:     lowerList(c.ImportAllowedSchemes),
		disallowedSchemes:  lowerList(c.ImportDisallowedSchemes),
		allowedHosts:       hostList(c.ImportAllowedHosts),
		disallowedHosts:    hostList(c.ImportDisallowedHosts),
		allowedPorts:       c.ImportAllowedPorts,
		disallowedPorts:    c.ImportDisallowedPorts,
		allowedNetworks:    c.ImportAllowedNetworks,
		disallowedNetworks: c.ImportDisallowedNetworks,
		maxRedirects:       c.ImportMaxRedirects,
		proxy:              c.ImportProxy,
	}
	if len(r.allowedSchemes) == 0 {
		r.allowedSchemes = DefaultImportSchemes
	}
	if len(r.allowedPorts) == 0 {
		r.allowedPorts = DefaultImportPorts
	}
	return r
}

func lowerList(in []string) []string {
	var out []string
	for _, s := range in {
		if s = strings.ToLower(strings.TrimSpace(s)); s != "" {
			out = append(out, s)
		}
	}
	return out
}

func hostList(in []string) []string {
	out := lowerList(in)
	for i, h := range out {
		out[i] = canonicalHost(h)
	}
	return out
}

// canonicalHost is the form hosts are compared in: lower case, no
// trailing dot, no brackets, and one spelling of an IP address.
func canonicalHost(h string) string {
	h = strings.TrimSuffix(strings.Trim(strings.ToLower(h), "[]"), ".")
	if ip, err := netip.ParseAddr(h); err == nil {
		return ip.Unmap().String()
	}
	return h
}

// checkURL holds one URL (the first, or a redirect's target) to the
// scheme, host and port rules, modelled on Glance's import filtering with
// two differences that only ever refuse more: a deny-list applies even
// when an allow-list is set (Glance then ignores it), so an entry in both
// is refused; and a URL without a port is held to its scheme's default
// port (Glance checks only a port written in the URL), so http://host/
// and http://host:80/ are one URL to the rules.
func (r importRules) checkURL(u *url.URL) error {
	scheme := strings.ToLower(u.Scheme)
	switch {
	case !slices.Contains(supportedSchemes, scheme):
		return refusal(events.RuleImportScheme, fmt.Sprintf("%q: only http and https URLs are imported", u.Scheme), "give an http or https URL")
	case !slices.Contains(r.allowedSchemes, scheme):
		return refusal(events.RuleImportScheme, fmt.Sprintf("%s is not in IMAGEPIPE_IMPORT_ALLOWED_SCHEMES (%s)", scheme, strings.Join(r.allowedSchemes, ",")), "use an allowed scheme, or ask the operator")
	case slices.Contains(r.disallowedSchemes, scheme):
		return refusal(events.RuleImportScheme, fmt.Sprintf("%s is in IMAGEPIPE_IMPORT_DISALLOWED_SCHEMES", scheme), "use another scheme")
	}
	host := canonicalHost(u.Hostname())
	switch {
	case host == "":
		return refusal(events.RuleImportHost, "the URL names no host", "give a URL with a host")
	case len(r.allowedHosts) > 0 && !hostListed(r.allowedHosts, host):
		return refusal(events.RuleImportHost, fmt.Sprintf("%s is not in IMAGEPIPE_IMPORT_ALLOWED_HOSTS", host), "import from an allowed host, or ask the operator")
	case hostListed(r.disallowedHosts, host):
		return refusal(events.RuleImportHost, fmt.Sprintf("%s is in IMAGEPIPE_IMPORT_DISALLOWED_HOSTS", host), "import from another host")
	}
	port, err := urlPort(u)
	if err != nil {
		return refusal(events.RuleImportPort, err.Error(), "give a port from 1 to 65535")
	}
	return r.checkPort(port)
}

func (r importRules) checkPort(port uint16) error {
	listed := func(list []PortRange) bool {
		return slices.ContainsFunc(list, func(p PortRange) bool { return p.contains(port) })
	}
	switch {
	case !listed(r.allowedPorts):
		return refusal(events.RuleImportPort, fmt.Sprintf("port %d is not in IMAGEPIPE_IMPORT_ALLOWED_PORTS", port), "serve the file on an allowed port (80 and 443 by default), or ask the operator")
	case listed(r.disallowedPorts):
		return refusal(events.RuleImportPort, fmt.Sprintf("port %d is in IMAGEPIPE_IMPORT_DISALLOWED_PORTS", port), "serve the file on another port")
	}
	return nil
}

// hostListed matches host exactly, or under an entry that starts with a
// dot (".example.com" matches a.example.com, not example.com).
func hostListed(list []string, host string) bool {
	return slices.ContainsFunc(list, func(e string) bool {
		return e == host || strings.HasPrefix(e, ".") && strings.HasSuffix(host, e)
	})
}

func urlPort(u *url.URL) (uint16, error) {
	p := u.Port()
	if p == "" {
		if strings.EqualFold(u.Scheme, "https") {
			return 443, nil
		}
		return 80, nil
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%q is not a port", p)
	}
	return uint16(n), nil
}

// checkAddr holds one IP address to the address rule: a disallowed network
// is refused, an allowed one admitted, and otherwise only a globally
// reachable address is.
func (r importRules) checkAddr(ip netip.Addr) error {
	ip = ip.WithZone("").Unmap()
	in := func(list []netip.Prefix) bool {
		return slices.ContainsFunc(list, func(p netip.Prefix) bool { return p.Contains(ip) })
	}
	switch {
	case in(r.disallowedNetworks):
		return refusal(events.RuleImportAddress, "the source's address is in IMAGEPIPE_IMPORT_DISALLOWED_NETWORKS", "import from a public address")
	case in(r.allowedNetworks):
		return nil
	}
	if kind := addressKind(ip); kind != "" {
		return refusal(events.RuleImportAddress, "the source's address is "+kind+", not a public one",
			"import from a public address; an operator can allow a network with IMAGEPIPE_IMPORT_ALLOWED_NETWORKS")
	}
	return nil
}

// control is the dialer's last word before every connect(2): address is
// the IP and port the socket is about to reach, after DNS, for the first
// URL and every redirect alike, so neither a name that resolves to
// 127.0.0.1 nor a redirect to one gets past it.
func (r importRules) control(_, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return refusal(events.RuleImportAddress, "the source's address could not be judged", "import from a public address")
	}
	err = r.checkAddr(ap.Addr())
	if err == nil {
		err = r.checkPort(ap.Port())
	}
	if ref, ok := err.(*importRefusal); ok {
		ref.addr = address
	}
	return err
}

// checkResolved judges the addresses a name resolves to now. It is the
// check through a proxy, which dials the source itself: the proxy must
// enforce the address rule too (a name can resolve differently for it),
// this only turns away what is plainly internal.
func (r importRules) checkResolved(ctx context.Context, host string) error {
	if ip, err := netip.ParseAddr(strings.Trim(host, "[]")); err == nil {
		return r.checkAddr(ip)
	}
	ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		// The proxy may resolve names this host cannot; it decides.
		return nil
	}
	for _, ip := range ips {
		if err := r.checkAddr(ip); err != nil {
			return err
		}
	}
	return nil
}

// checkRedirect holds every redirect to the rules of the first URL, a
// limit on their number, and refuses a step down from https to http.
func (r importRules) checkRedirect(req *http.Request, via []*http.Request) error {
	if len(via) > r.maxRedirects {
		return refusal(events.RuleImportRedirects, fmt.Sprintf("the source redirected more than %d times (IMAGEPIPE_IMPORT_MAX_REDIRECTS)", r.maxRedirects), "give the URL the redirects end at")
	}
	prev := via[len(via)-1].URL
	if strings.EqualFold(prev.Scheme, "https") && !strings.EqualFold(req.URL.Scheme, "https") {
		return refusal(events.RuleImportRedirects, "the source redirected from https to "+req.URL.Scheme, "give an https URL that stays on https")
	}
	if err := r.checkURL(req.URL); err != nil {
		return err
	}
	if r.proxy != nil {
		return r.checkResolved(req.Context(), req.URL.Hostname())
	}
	return nil
}

// client is the HTTP client of imports. It never reads HTTP_PROXY and
// friends: a proxy from the environment would dial the source itself and
// skip the address rule unseen. A proxy is used only when named by
// IMAGEPIPE_IMPORT_PROXY, and every connection then goes to it.
func (r importRules) client(idle time.Duration) *http.Client {
	dialer := &net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
	var proxy func(*http.Request) (*url.URL, error)
	if r.proxy != nil {
		proxy = http.ProxyURL(r.proxy)
	} else {
		dialer.Control = r.control
	}
	return &http.Client{
		Transport: &http.Transport{
			Proxy:                 proxy,
			DialContext:           dialer.DialContext,
			TLSHandshakeTimeout:   30 * time.Second,
			ResponseHeaderTimeout: idle,
			// An image is already compressed or incompressible; a gzip
			// transfer encoding would hide the real length.
			DisableCompression: true,
			ForceAttemptHTTP2:  true,
		},
		CheckRedirect: r.checkRedirect,
	}
}
