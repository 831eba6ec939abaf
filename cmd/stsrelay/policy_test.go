package main

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stsrelay/stsrelay/config"
	"github.com/stsrelay/stsrelay/resolve"
)

func TestRemoteResolversAreTheNonLoopbackOnes(t *testing.T) {
	got := remoteResolvers([]string{"127.0.0.1:53", "[::1]:53", "localhost:53", "127.0.0.53:53", "192.0.2.1:53", "[2001:db8::1]:53", "[::ffff:127.0.0.1]:53"})
	if want := []string{"192.0.2.1:53", "[2001:db8::1]:53"}; !slices.Equal(got, want) {
		t.Errorf("remote = %q, want %q", got, want)
	}
}

// warnings returns the start-up warnings for cfg with a resolver at server
// (nothing is sent to it).
func warnings(t *testing.T, cfg *config.Config, server string) string {
	t.Helper()
	res, err := resolve.New(resolve.Config{Servers: []string{server}})
	if err != nil {
		t.Fatal(err)
	}
	return strings.Join(policyWarnings(cfg, res), "\n")
}

func TestDANEWarnsAboutARemoteResolverUnlessTrusted(t *testing.T) {
	const warning = "DANE trusts the DNSSEC status (AD bit) of resolver [192.0.2.1:53], which is not on this host"
	cfg := config.Default()
	if w := warnings(t, cfg, "192.0.2.1:53"); !strings.Contains(w, warning) {
		t.Errorf("no warning about a remote resolver: %q", w)
	}
	if w := warnings(t, cfg, "127.0.0.1:53"); w != "" {
		t.Errorf("warned with DANE on a loopback resolver: %q", w)
	}
	cfg.DANE.TrustRemoteResolver = true
	if w := warnings(t, cfg, "192.0.2.1:53"); w != "" {
		t.Errorf("dane.trust_remote_resolver did not silence the warning: %q", w)
	}

	cfg = config.Default()
	cfg.DANE.Enabled = false
	if w := warnings(t, cfg, "192.0.2.1:53"); strings.Contains(w, "AD bit") || !strings.Contains(w, "DANE is disabled") {
		t.Errorf("DANE off: %q", w)
	}
	cfg.Delivery.Policies = []config.Policy{{Domains: []string{"partner.example"}, TLS: "dane-only"}}
	if w := warnings(t, cfg, "192.0.2.1:53"); !strings.Contains(w, "except where a [[delivery.policy]] entry says dane") || !strings.Contains(w, "AD bit") {
		t.Errorf("DANE off but asked for by a policy entry: %q", w)
	}
}

// With dane.enabled = false, DANE still applies where the most specific
// [[delivery.policy]] entry says dane or dane-only, and a reload moves it.
func TestDANEScopeFollowsThePolicyEntries(t *testing.T) {
	res, err := resolve.New(resolve.Config{Servers: []string{"127.0.0.1:1"}})
	if err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	cfg.Hostname = "relay.test"
	p, err := buildDelivery(cfg, res, nil, nil, nil, nil)
	if err != nil || !p.dane.Applies("any.example") {
		t.Fatalf("default: %v; DANE applies to any.example: %v", err, p.dane.Applies("any.example"))
	}
	p.engine.Close()

	cfg.DANE.Enabled = false
	cfg.Delivery.Policies = []config.Policy{
		{Domains: []string{".partner.example"}, TLS: "dane-only"},
		{Domains: []string{"x.partner.example"}, TLS: "may"},
		{Domains: []string{"other.example"}, TLS: "dane"},
	}
	p, err = buildDelivery(cfg, res, nil, nil, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer p.engine.Close()
	for domain, want := range map[string]bool{"a.partner.example": true, "x.partner.example": false,
		"other.example": true, "any.example": false} {
		if got := p.dane.Applies(domain); got != want {
			t.Errorf("DANE applies to %s: %v, want %v", domain, got, want)
		}
	}
	scope, err := daneScope(config.Delivery{Policies: []config.Policy{{Domains: []string{"any.example"}, TLS: "dane"}}})
	if err != nil {
		t.Fatal(err)
	}
	p.daneScope.Store(scope)
	if !p.dane.Applies("any.example") || p.dane.Applies("other.example") {
		t.Error("a new scope did not take effect")
	}
}

// The route settings a postmaster most likely did not mean are named at
// start: a password over TLS that may go unverified, a password file
// every user can read (group stsrelay may: README's mode 0640), port 465
// without implicit TLS and implicit TLS on 25.
func TestRouteWarnings(t *testing.T) {
	dir := t.TempDir()
	open, closed := filepath.Join(dir, "open.pass"), filepath.Join(dir, "closed.pass")
	for file, mode := range map[string]os.FileMode{open: 0o644, closed: 0o640} {
		if err := os.WriteFile(file, []byte("pw\n"), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(file, mode); err != nil {
			t.Fatal(err)
		}
	}
	cfg := config.Default()
	cfg.Delivery.Routes = []config.Route{
		{Nexthop: "smtp.example.net:587", AuthUsername: "u", AuthPasswordFile: closed},
		{Nexthop: "smtp.example.net:587", TLS: "encrypt", AuthUsername: "u", AuthPasswordFile: open},
		{Nexthop: "[smtp.example.net]:465"},
		{Nexthop: "[smtp.example.net]:465", ImplicitTLS: true},
		{Nexthop: "mx.example.net", ImplicitTLS: true},
	}
	got := routeWarnings(cfg)
	want := []string{
		`delivery.route[1] sends its password over TLS whose certificate may go unchecked (tls = "encrypt")`,
		"delivery.route[1].auth_password_file " + open + " can be read by every user (mode 0644)",
		"delivery.route[2]: port 465 is for TLS from the first byte",
		"delivery.route[4]: implicit_tls = true on port 25",
	}
	if len(got) != len(want) {
		t.Fatalf("warnings %q, want %d", got, len(want))
	}
	for i := range want {
		if !strings.HasPrefix(got[i], want[i]) {
			t.Errorf("warning %d: %q, want it to begin %q", i, got[i], want[i])
		}
	}
}
