package routing_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/stsrelay/stsrelay/routing"
)

func patterns(t *testing.T, ss ...string) []routing.Pattern {
	t.Helper()
	var out []routing.Pattern
	for _, s := range ss {
		p, err := routing.ParsePattern(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, p)
	}
	return out
}

func senders(t *testing.T, ss ...string) []routing.SenderPattern {
	t.Helper()
	var out []routing.SenderPattern
	for _, s := range ss {
		p, err := routing.ParseSender(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, p)
	}
	return out
}

func TestPatternMatches(t *testing.T) {
	for _, tc := range []struct {
		pattern, name string
		want          bool
	}{
		{"example.org", "example.org", true},
		{"example.org", "EXAMPLE.org.", true},
		{"example.org", "mail.example.org", false},
		{".example.org", "mail.example.org", true},
		{".example.org", "a.b.example.org", true},
		{".example.org", "example.org", false},
		{".example.org", "badexample.org", false},
		{"*", "anything.test", true},
	} {
		p := patterns(t, tc.pattern)[0]
		if got := p.Match(tc.name); got != tc.want {
			t.Errorf("%s matches %s = %v, want %v", tc.pattern, tc.name, got, tc.want)
		}
	}
	for _, bad := range []string{"", "exa mple.org", "*.example.org", ".", "..example.org", "-x.org"} {
		if _, err := routing.ParsePattern(bad); err == nil {
			t.Errorf("ParsePattern(%q) accepted", bad)
		}
	}
}

func TestMostSpecificEntryWins(t *testing.T) {
	tab, err := routing.NewTable([]routing.Entry[string]{
		{Domains: patterns(t, "*"), Value: "any"},
		{Domains: patterns(t, ".example.org"), Value: "sub"},
		{Domains: patterns(t, ".mail.example.org"), Value: "deeper"},
		{Domains: patterns(t, "example.org"), Value: "exact"},
		{Domains: patterns(t, "*"), Senders: senders(t, "@tenant.test"), Value: "tenant"},
		{Domains: patterns(t, "*"), Senders: senders(t, "boss@tenant.test"), Value: "boss"},
		{Domains: patterns(t, "*"), Senders: senders(t, "<>"), Value: "bounces"},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ domain, sender, want string }{
		{"other.test", "a@x.test", "any"},
		{"example.org", "a@x.test", "exact"},
		{"a.example.org", "a@x.test", "sub"},
		{"x.mail.example.org", "a@x.test", "deeper"},
		{"other.test", "a@tenant.test", "tenant"},
		{"other.test", "Boss@Tenant.test", "boss"},
		{"other.test", "", "bounces"},
		// The domain decides first: an exact route beats a sender route.
		{"example.org", "boss@tenant.test", "exact"},
	} {
		got, _, ok := tab.Lookup(tc.domain, tc.sender)
		if !ok || got != tc.want {
			t.Errorf("Lookup(%s, %s) = %q, %v; want %q", tc.domain, tc.sender, got, ok, tc.want)
		}
	}
}

func TestNoEntryMatches(t *testing.T) {
	tab, err := routing.NewTable([]routing.Entry[int]{
		{Domains: patterns(t, "example.org"), Value: 1},
		{Domains: patterns(t, "*"), Senders: senders(t, "@tenant.test"), Value: 2},
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, i, ok := tab.Lookup("other.test", "a@other.test"); ok || i != -1 {
		t.Errorf("Lookup matched entry %d", i)
	}
	var none *routing.Table[int]
	if _, _, ok := none.Lookup("x.test", ""); ok {
		t.Error("a nil table matched")
	}
}

func TestEntriesWithTheSameSpecificityConflict(t *testing.T) {
	for _, tc := range []struct {
		name string
		a, b routing.Entry[int]
		bad  bool
	}{
		{"same domain", routing.Entry[int]{Domains: patterns(t, "a.test", "example.org")}, routing.Entry[int]{Domains: patterns(t, "EXAMPLE.org.")}, true},
		{"two stars", routing.Entry[int]{Domains: patterns(t, "*")}, routing.Entry[int]{Domains: patterns(t, "*")}, true},
		{"same sender", routing.Entry[int]{Domains: patterns(t, "*"), Senders: senders(t, "@t.test")},
			routing.Entry[int]{Domains: patterns(t, "*"), Senders: senders(t, "@T.test")}, true},
		{"sender and none", routing.Entry[int]{Domains: patterns(t, "*"), Senders: senders(t, "@t.test")}, routing.Entry[int]{Domains: patterns(t, "*")}, false},
		{"exact and subdomains", routing.Entry[int]{Domains: patterns(t, "example.org")}, routing.Entry[int]{Domains: patterns(t, ".example.org")}, false},
	} {
		_, err := routing.NewTable([]routing.Entry[int]{tc.a, tc.b})
		var ce *routing.ConflictError
		if tc.bad != errors.As(err, &ce) {
			t.Errorf("%s: err = %v", tc.name, err)
		}
		if tc.bad && (ce.First != 0 || ce.Second != 1) {
			t.Errorf("%s: conflict names entries %d and %d", tc.name, ce.First, ce.Second)
		}
	}
}

func TestParseNexthop(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want routing.Nexthop
		out  string
	}{
		{"smtp.provider.test:587", routing.Nexthop{Host: "smtp.provider.test", Port: 587, MX: true}, "smtp.provider.test:587"},
		{"Provider.test", routing.Nexthop{Host: "provider.test", Port: 25, MX: true}, "provider.test"},
		{"[mail.internal.test]:2525", routing.Nexthop{Host: "mail.internal.test", Port: 2525}, "[mail.internal.test]:2525"},
		{"[mail.internal.test]", routing.Nexthop{Host: "mail.internal.test", Port: 25}, "[mail.internal.test]"},
		{"[192.0.2.7]:465", routing.Nexthop{Host: "192.0.2.7", Port: 465}, "[192.0.2.7]:465"},
		{"[IPv6:2001:db8::1]:25", routing.Nexthop{Host: "2001:db8::1", Port: 25}, "[2001:db8::1]"},
	} {
		got, err := routing.ParseNexthop(tc.in)
		if err != nil {
			t.Errorf("ParseNexthop(%q): %v", tc.in, err)
			continue
		}
		if got.Host != tc.want.Host || got.Port != tc.want.Port || got.MX != tc.want.MX {
			t.Errorf("ParseNexthop(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
		if isAddr := strings.ContainsAny(tc.want.Host, ":") || tc.want.Host == "192.0.2.7"; got.Addr.IsValid() != isAddr {
			t.Errorf("ParseNexthop(%q): Addr = %v", tc.in, got.Addr)
		}
		if got.String() != tc.out {
			t.Errorf("String() = %q, want %q", got.String(), tc.out)
		}
	}
	for _, bad := range []string{"", "[host", "host:", "host:0", "host:70000", "host:25x", "192.0.2.1:25",
		"[fe80::1%eth0]", "[]:25", "[host]x", "two words", "host:+25"} {
		if n, err := routing.ParseNexthop(bad); err == nil {
			t.Errorf("ParseNexthop(%q) = %+v, want an error", bad, n)
		}
	}
}

// A sender pattern written with the domain's trailing dot matches as the
// same domain does without it (the config takes both), and the two are
// one pattern when routes are checked for ties.
func TestSenderPatternWithATrailingDot(t *testing.T) {
	for _, tc := range []struct {
		pattern, sender string
	}{{"@Example.org.", "u@example.org"}, {"user@example.org.", "User@example.org"}} {
		if p := senders(t, tc.pattern)[0]; !p.Match(tc.sender) {
			t.Errorf("%s does not match %s", tc.pattern, tc.sender)
		}
	}
	_, err := routing.NewTable([]routing.Entry[string]{
		{Domains: patterns(t, "*"), Senders: senders(t, "@a.org"), Value: "one"},
		{Domains: patterns(t, "*"), Senders: senders(t, "@A.org."), Value: "two"},
	})
	if err == nil {
		t.Error("@a.org and @A.org. were taken for different senders")
	}
}

// A sender-dependent route for an internationalised domain applies to
// its SMTPUTF8 senders, whose domain comes in U-labels, and may be
// written in either form.
func TestSenderPatternMatchesADomainInEitherForm(t *testing.T) {
	for _, tc := range []struct {
		pattern, sender string
		match           bool
	}{
		{"@xn--bcher-kva.example", "a@bücher.example", true},
		{"@Bücher.example", "a@xn--bcher-kva.example", true},
		{"@bücher.example", "a@BÜCHER.example", true},
		{"jörg@bücher.example", "Jörg@bücher.example", true},
		{"@xn--bcher-kva.example", "a@bucher.example", false},
		{"@strasse.de", "a@STRAẞE.de", true},
		{"@xn--strae-oqa.de", "a@STRAẞE.de", false},
	} {
		if got := senders(t, tc.pattern)[0].Match(tc.sender); got != tc.match {
			t.Errorf("%s matching %s: %v, want %v", tc.pattern, tc.sender, got, tc.match)
		}
	}
}

// A route written for an internationalised domain in U-labels applies to
// its recipients, whose domains the queue keeps in A-labels.
func TestDomainPatternInUnicodeMatchesTheALabels(t *testing.T) {
	for _, tc := range []struct{ pattern, name string }{
		{"Bücher.example", "xn--bcher-kva.example"},
		{".bücher.example", "mx.xn--bcher-kva.example"},
		{"STRAẞE.de.", "strasse.de"},
	} {
		p, err := routing.ParsePattern(tc.pattern)
		if err != nil || !p.Match(tc.name) {
			t.Errorf("%s: %v, matches %s: %v", tc.pattern, err, tc.name, err == nil && p.Match(tc.name))
		}
	}
	for _, bad := range []string{"bü cher.example", ".", "..example", "*.example"} {
		if _, err := routing.ParsePattern(bad); err == nil {
			t.Errorf("%q taken for a pattern", bad)
		}
	}
}

func TestALabels(t *testing.T) {
	for in, want := range map[string]string{
		"Example.COM.":          "example.com",
		"host_1.example":        "host_1.example", // IDNA would refuse the underscore
		"Bücher.Example":        "xn--bcher-kva.example",
		"xn--bcher-kva.example": "xn--bcher-kva.example",
		"straße.de":             "xn--strae-oqa.de",
		"STRAẞE.de":             "strasse.de", // UTS #46 folds ẞ to ss; Go's ToLower to ß
		"xn--zz.example":        "",           // no A-label: "zz" is no Punycode of a valid U-label
		"xn--.example":          "",
		"xn--abc-.example":      "",
		"XN--BCHER-KVA.example": "xn--bcher-kva.example",
		"host_1.xn--9ca":        "host_1.xn--9ca",        // é, beside an underscore IDNA would refuse
		"bü\u00adcher.example":  "xn--bcher-kva.example", // a soft hyphen maps to nothing
		"\x80.example":          "",
	} {
		if got := routing.ALabels(in); got != want {
			t.Errorf("ALabels(%q) = %q, want %q", in, got, want)
		}
	}
}
