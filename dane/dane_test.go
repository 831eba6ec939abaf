package dane

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/resolve"
)

var hashA = strings.Repeat("aa", 32)

// zone is a dnstest server and a Source that asks it.
type zone struct {
	t   *testing.T
	dns *dnstest.Server
	res *resolve.Resolver
	src *Source
}

func newZone(t *testing.T, records ...string) *zone {
	t.Helper()
	z := &zone{t: t, dns: dnstest.New(t, records...)}
	var err error
	z.res, err = resolve.New(resolve.Config{Servers: []string{z.dns.Addr}, Timeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	z.src, err = New(Options{Resolver: z.res})
	if err != nil {
		t.Fatal(err)
	}
	return z
}

// mx is the MX host name as delivery's route sees it: its address lookup
// done, aliases followed, with the DNSSEC status of each answer.
func (z *zone) mx(name string, mxSecure bool) policy.MX {
	z.t.Helper()
	_, res, err := z.res.Addrs(z.t.Context(), name, resolve.IPv4)
	if err != nil {
		z.t.Fatal(err)
	}
	m := policy.MX{Name: name, Final: strings.TrimSuffix(res.Final, "."), MXSecure: mxSecure, AddrSecure: res.Secure,
		AliasSigned: res.AliasSigned}
	for _, c := range res.CNAMEs {
		m.CNAMEs = append(m.CNAMEs, strings.TrimSuffix(c, "."))
	}
	return m
}

func (z *zone) lookup(name string, mxSecure bool) *Host {
	z.t.Helper()
	return z.src.Lookup(z.t.Context(), "example.test", z.mx(name, mxSecure))
}

func (z *zone) tlsaQueries(base string) int {
	return z.dns.Queries("_25._tcp."+base, dns.TypeTLSA)
}

func wantDANE(t *testing.T, h *Host, base string) {
	t.Helper()
	r := h.Requirement
	if r.Security != policy.SecurityDANE || r.Source() != policy.TypeTLSA || r.DANE == nil || r.Skip != "" {
		t.Fatalf("requirement %+v (note %q), want DANE", r, h.Note)
	}
	if h.Base != base || r.ServerName != base {
		t.Errorf("base %q, SNI %q; want %q for both (RFC 7672 §8.1)", h.Base, r.ServerName, base)
	}
	if r.Domain() != "example.test" || !r.MXValidated {
		t.Errorf("policy domain %q, MX validated %v", r.Domain(), r.MXValidated)
	}
}

func wantNoDANE(t *testing.T, h *Host, note string) {
	t.Helper()
	if h.Requirement.Policy != nil || h.Requirement.Skip != "" {
		t.Fatalf("requirement %+v, want none (DANE does not apply)", h.Requirement)
	}
	if !strings.Contains(h.Note, note) {
		t.Errorf("note %q, want it to say %q", h.Note, note)
	}
}

func TestSecureMXWithTLSAIsDANE(t *testing.T) {
	z := newZone(t,
		"mx.example.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx.example.test. 300 IN TLSA 3 1 1 "+hashA,
		"_25._tcp.mx.example.test. 300 IN TLSA 1 1 1 "+hashA)
	z.dns.Secure("mx.example.test", "_25._tcp.mx.example.test")
	h := z.lookup("mx.example.test", true)
	wantDANE(t, h, "mx.example.test")
	want := []string{"3 1 1 " + hashA, "1 1 1 " + hashA}
	if got := h.Requirement.Policy.Strings; !slices.Equal(got, want) {
		t.Errorf("policy strings %q, want every record %q", got, want)
	}
	if !slices.Equal(h.Requirement.Names, []string{"mx.example.test", "example.test"}) {
		t.Errorf("reference identifiers %q", h.Requirement.Names)
	}
	if len(h.Records) != 2 || !h.Records[0].Usable || h.Records[1].Usable {
		t.Errorf("records %+v, want the DANE-EE usable, the PKIX-EE not", h.Records)
	}
}

func TestInsecureAnswersMeanNoDANEAndNoTLSAQuery(t *testing.T) {
	for _, tc := range []struct {
		name     string
		mxSecure bool
		secure   []string
		note     string
	}{
		{"insecure MX RRset", false, []string{"mx.example.test", "_25._tcp.mx.example.test"}, "MX records not DNSSEC-validated"},
		{"insecure address records", true, []string{"_25._tcp.mx.example.test"}, "addresses of the MX host not DNSSEC-validated"},
		// A resolver that does not validate never sets AD: nothing is
		// secure, whatever the zones publish.
		{"resolver without AD", true, nil, "addresses of the MX host not DNSSEC-validated"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			z := newZone(t,
				"mx.example.test. 300 IN A 127.0.0.2",
				"_25._tcp.mx.example.test. 300 IN TLSA 3 1 1 "+hashA)
			z.dns.Secure(tc.secure...)
			wantNoDANE(t, z.lookup("mx.example.test", tc.mxSecure), tc.note)
			if n := z.tlsaQueries("mx.example.test"); n != 0 {
				t.Errorf("TLSA queried %d times; RFC 7672 §2.2.2 says not to", n)
			}
		})
	}
}

func TestNoTLSARecordsMeansNoDANE(t *testing.T) {
	z := newZone(t, "mx.example.test. 300 IN A 127.0.0.2", "mx.example.test. 300 IN TXT \"x\"")
	z.dns.Secure("mx.example.test", "_25._tcp.mx.example.test")
	wantNoDANE(t, z.lookup("mx.example.test", true), "no DNSSEC-validated TLSA records at mx.example.test")
	// NODATA at an existing owner, too.
	z.dns.Add(t, "_25._tcp.mx.example.test. 300 IN TXT \"not a TLSA\"")
	wantNoDANE(t, newZoneLike(z).lookup("mx.example.test", true), "no DNSSEC-validated TLSA records")
}

// newZoneLike is a fresh Source and resolver (empty cache) on z's server.
func newZoneLike(z *zone) *zone {
	n := &zone{t: z.t, dns: z.dns}
	n.res, _ = resolve.New(resolve.Config{Servers: []string{z.dns.Addr}, Timeout: 300 * time.Millisecond})
	n.src, _ = New(Options{Resolver: n.res})
	return n
}

// Records in a zone that is not signed are no policy (RFC 7672 §2.2).
func TestInsecureTLSARecordsAreIgnored(t *testing.T) {
	z := newZone(t,
		"mx.example.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx.example.test. 300 IN TLSA 3 1 1 "+hashA)
	z.dns.Secure("mx.example.test")
	wantNoDANE(t, z.lookup("mx.example.test", true), "no DNSSEC-validated TLSA records")
}

// RFC 7672 §2.2.2, §2.2.3: a secure CNAME chain: the expanded name first.
func TestCNAMEToSecureZoneUsesTLSAAtTheExpandedName(t *testing.T) {
	z := newZone(t,
		"mx.example.test. 300 IN CNAME mx.provider.test.",
		"mx.provider.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx.provider.test. 300 IN TLSA 3 1 1 "+hashA,
		"_25._tcp.mx.example.test. 300 IN TLSA 3 1 1 "+strings.Repeat("bb", 32))
	z.dns.Secure("mx.example.test", "mx.provider.test", "_25._tcp.mx.provider.test", "_25._tcp.mx.example.test")
	h := z.lookup("mx.example.test", true)
	wantDANE(t, h, "mx.provider.test")
	if !slices.Equal(h.Candidates, []string{"mx.provider.test", "mx.example.test"}) {
		t.Errorf("candidates %q", h.Candidates)
	}
	if h.Requirement.Policy.Strings[0] != "3 1 1 "+hashA {
		t.Errorf("records %q, want those of the expanded name", h.Requirement.Policy.Strings)
	}
	if !slices.Equal(h.Requirement.Names, []string{"mx.provider.test", "mx.example.test", "example.test"}) {
		t.Errorf("reference identifiers %q, want base, MX name, next-hop domain", h.Requirement.Names)
	}
	if n := z.tlsaQueries("mx.example.test"); n != 0 {
		t.Errorf("the original name was queried although the expanded one had records")
	}
}

func TestCNAMEChainWithTLSAOnlyAtTheOriginalName(t *testing.T) {
	z := newZone(t,
		"mx.example.test. 300 IN CNAME mx.provider.test.",
		"mx.provider.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx.example.test. 300 IN TLSA 3 1 1 "+hashA)
	z.dns.Secure("mx.example.test", "mx.provider.test", "_25._tcp.mx.example.test", "_25._tcp.mx.provider.test")
	h := z.lookup("mx.example.test", true)
	wantDANE(t, h, "mx.example.test")
	if n := z.tlsaQueries("mx.provider.test"); n != 1 {
		t.Errorf("expanded name queried %d times, want first, once", n)
	}
}

// RFC 7672 §2.2.2: the first CNAME secure, the final addresses not: only
// the original name is a candidate.
func TestInsecureCNAMETargetLeavesOnlyTheOriginalName(t *testing.T) {
	z := newZone(t,
		"mx.example.test. 300 IN CNAME mx.unsigned.test.",
		"mx.unsigned.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx.unsigned.test. 300 IN TLSA 3 1 1 "+strings.Repeat("bb", 32),
		"_25._tcp.mx.example.test. 300 IN TLSA 3 1 1 "+hashA)
	z.dns.Secure("mx.example.test", "_25._tcp.mx.example.test")
	h := z.lookup("mx.example.test", true)
	wantDANE(t, h, "mx.example.test")
	if !slices.Equal(h.Candidates, []string{"mx.example.test"}) {
		t.Errorf("candidates %q, want the original name only", h.Candidates)
	}
	if n := z.tlsaQueries("mx.unsigned.test"); n != 0 {
		t.Errorf("TLSA at the insecure target queried %d times", n)
	}
}

// RFC 7672 §2.2.2: an insecure first CNAME: no DANE at all.
func TestInsecureFirstCNAMEMeansNoDANE(t *testing.T) {
	z := newZone(t,
		"mx.example.test. 300 IN CNAME mx.provider.test.",
		"mx.provider.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx.provider.test. 300 IN TLSA 3 1 1 "+hashA,
		"_25._tcp.mx.example.test. 300 IN TLSA 3 1 1 "+hashA)
	z.dns.Secure("mx.provider.test", "_25._tcp.mx.provider.test", "_25._tcp.mx.example.test")
	wantNoDANE(t, z.lookup("mx.example.test", true), "CNAME of the MX host not DNSSEC-validated")
	if n := z.tlsaQueries("mx.provider.test") + z.tlsaQueries("mx.example.test"); n != 0 {
		t.Errorf("%d TLSA queries, want none", n)
	}
}

// The CNAME SERVFAIL pitfall: an unsigned provider whose servers fail
// CNAME queries must still get mail, without DANE.
func TestCNAMELookupFailureInAnInsecureChainNeverBlocks(t *testing.T) {
	z := newZone(t,
		"mx.example.test. 300 IN CNAME mx.unsigned.test.",
		"mx.unsigned.test. 300 IN A 127.0.0.2")
	z.dns.SetFault("mx.example.test", dns.TypeCNAME, dnstest.FaultServfail)
	h := z.lookup("mx.example.test", true)
	wantNoDANE(t, h, "CNAME lookup failed (SERVFAIL)")
}

// The same failure where the address answer shows the alias's zone
// signed (its CNAME came with an RRSIG) is one in a signed zone (§2.1.1):
// the host defers rather than lose DANE, which whoever made the query
// fail would otherwise switch off.
func TestCNAMELookupFailureInASignedZoneDefers(t *testing.T) {
	z := newZone(t,
		"mx.example.test. 300 IN CNAME mx.unsigned.test.",
		"mx.unsigned.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx.example.test. 300 IN TLSA 3 1 1 "+hashA)
	z.dns.Secure("mx.example.test", "_25._tcp.mx.example.test")
	wantDANE(t, z.lookup("mx.example.test", true), "mx.example.test")

	z = newZoneLike(z)
	z.dns.SetFault("mx.example.test", dns.TypeCNAME, dnstest.FaultServfail)
	h := z.lookup("mx.example.test", true)
	r := h.Requirement
	if r.Security != policy.SecurityDANE || r.Source() != policy.TypeTLSA ||
		r.Skip != "CNAME lookup for mx.example.test failed in its signed zone: SERVFAIL" || r.SkipResult != policy.ResultDNSSECInvalid {
		t.Fatalf("requirement %+v (note %q), want DANE skipped for the failed lookup", r, h.Note)
	}
}

// RFC 7672 §2.2.2: the names between the first and the last of a chain
// are never TLSA base domains.
func TestIntermediateCNAMEsAreNeverCandidates(t *testing.T) {
	z := newZone(t,
		"mx.example.test. 300 IN CNAME a.provider.test.",
		"a.provider.test. 300 IN CNAME b.provider.test.",
		"b.provider.test. 300 IN A 127.0.0.2",
		"_25._tcp.a.provider.test. 300 IN TLSA 3 1 1 "+hashA)
	z.dns.Secure("mx.example.test", "a.provider.test", "b.provider.test",
		"_25._tcp.a.provider.test", "_25._tcp.b.provider.test", "_25._tcp.mx.example.test")
	h := z.lookup("mx.example.test", true)
	wantNoDANE(t, h, "no DNSSEC-validated TLSA records at b.provider.test or mx.example.test")
	if n := z.tlsaQueries("a.provider.test"); n != 0 {
		t.Errorf("the intermediate name was queried")
	}
}

// A CNAME at the TLSA owner is followed; the base domain stays (§2.2.3).
func TestCNAMEAtTheTLSAOwnerKeepsTheBaseDomain(t *testing.T) {
	z := newZone(t,
		"mx.example.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx.example.test. 300 IN CNAME tlsa.example.test.",
		"tlsa.example.test. 300 IN TLSA 3 1 1 "+hashA)
	z.dns.Secure("mx.example.test", "_25._tcp.mx.example.test", "tlsa.example.test")
	wantDANE(t, z.lookup("mx.example.test", true), "mx.example.test")
}

// Insecure TLSA at the expanded name (its owner aliased into an unsigned
// zone): the original name is tried next.
func TestInsecureTLSAAtTheExpandedNameFallsToTheOriginal(t *testing.T) {
	z := newZone(t,
		"mx.example.test. 300 IN CNAME mx.provider.test.",
		"mx.provider.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx.provider.test. 300 IN CNAME tlsa.unsigned.test.",
		"tlsa.unsigned.test. 300 IN TLSA 3 1 1 "+strings.Repeat("bb", 32),
		"_25._tcp.mx.example.test. 300 IN TLSA 3 1 1 "+hashA)
	z.dns.Secure("mx.example.test", "mx.provider.test", "_25._tcp.mx.provider.test", "_25._tcp.mx.example.test")
	h := z.lookup("mx.example.test", true)
	wantDANE(t, h, "mx.example.test")
}

// RFC 7672 §2.1.2, §2.2: a TLSA lookup failure in a secure zone makes that
// host unusable, with its reason; the domain's other hosts go on.
func TestTLSALookupFailureSkipsThatHostOnly(t *testing.T) {
	for _, tc := range []struct {
		name   string
		fault  dnstest.Fault
		result policy.ResultType
		text   string
	}{
		{"SERVFAIL", dnstest.FaultServfail, policy.ResultDNSSECInvalid, "TLSA lookup for _25._tcp.mx1.example.test failed: SERVFAIL"},
		{"timeout", dnstest.FaultDrop, policy.ResultDNSSECInvalid, "failed: timeout"},
		{"garbage", dnstest.FaultGarbage, policy.ResultDNSSECInvalid, "TLSA lookup for _25._tcp.mx1.example.test failed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			z := newZone(t,
				"mx1.example.test. 300 IN A 127.0.0.2",
				"mx2.example.test. 300 IN A 127.0.0.3",
				"_25._tcp.mx2.example.test. 300 IN TLSA 3 1 1 "+hashA)
			z.dns.Secure("mx1.example.test", "mx2.example.test", "_25._tcp.mx1.example.test", "_25._tcp.mx2.example.test")
			z.dns.SetFault("_25._tcp.mx1.example.test", dns.TypeTLSA, tc.fault)
			reqs, err := z.src.Requirements(t.Context(), "example.test",
				[]policy.MX{z.mx("mx1.example.test", true), z.mx("mx2.example.test", true)})
			if err != nil {
				t.Fatalf("a TLSA failure of one host failed the domain: %v", err)
			}
			r := reqs[0]
			if !r.Excluded() || r.Source() != policy.TypeTLSA || r.Security != policy.SecurityDANE ||
				r.SkipResultType() != tc.result || !strings.Contains(r.Skip, tc.text) {
				t.Errorf("mx1: %+v; want a DANE Skip %q with result %s", r, tc.text, tc.result)
			}
			if reqs[1].DANE == nil || reqs[1].Excluded() {
				t.Errorf("mx2: %+v, want its own DANE requirement", reqs[1])
			}
		})
	}
}

// A lookup failure at the expanded name is not a reason to try the
// original: that would let an attacker choose.
func TestTLSAFailureAtTheExpandedNameDoesNotFallThrough(t *testing.T) {
	z := newZone(t,
		"mx.example.test. 300 IN CNAME mx.provider.test.",
		"mx.provider.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx.example.test. 300 IN TLSA 3 1 1 "+hashA)
	z.dns.Secure("mx.example.test", "mx.provider.test", "_25._tcp.mx.example.test")
	z.dns.SetFault("_25._tcp.mx.provider.test", dns.TypeTLSA, dnstest.FaultServfail)
	h := z.lookup("mx.example.test", true)
	if !h.Requirement.Excluded() || h.Base != "mx.provider.test" {
		t.Fatalf("requirement %+v base %q, want the expanded name's failure", h.Requirement, h.Base)
	}
	if n := z.tlsaQueries("mx.example.test"); n != 0 {
		t.Error("fell through to the original name")
	}
}

// RFC 7672 §2.2: records exist but none is usable: TLS without
// authentication, never plaintext.
func TestUnusableRecordsOnlyMeanEncrypt(t *testing.T) {
	z := newZone(t,
		"mx.example.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx.example.test. 300 IN TLSA 1 1 1 "+hashA,
		"_25._tcp.mx.example.test. 300 IN TLSA 0 0 1 "+hashA,
		"_25._tcp.mx.example.test. 300 IN TLSA 4 1 1 "+hashA,
		"_25._tcp.mx.example.test. 300 IN TLSA 3 1 1 abcdef")
	z.dns.AddRR(&dns.RFC3597{Hdr: dns.RR_Header{Name: "_25._tcp.mx.example.test.", Rrtype: dns.TypeTLSA, Class: dns.ClassINET, Ttl: 300}, Rdata: "03"})
	z.dns.Secure("mx.example.test", "_25._tcp.mx.example.test")
	h := z.lookup("mx.example.test", true)
	r := h.Requirement
	if r.Security != policy.SecurityEncrypt || r.Source() != policy.TypeTLSA || r.DANE != nil || !r.MustTLS() || r.MustAuthenticate() {
		t.Fatalf("requirement %+v, want TLS required without authentication under the TLSA policy", r)
	}
	if len(r.Policy.Strings) != 5 || r.ServerName != "mx.example.test" {
		t.Errorf("policy strings %q, SNI %q", r.Policy.Strings, r.ServerName)
	}
	if !strings.Contains(h.Note, "none usable") {
		t.Errorf("note %q", h.Note)
	}
}

// Bad input: hundreds of records come over TCP and work.
func TestHundredsOfTLSARecords(t *testing.T) {
	z := newZone(t, "mx.example.test. 300 IN A 127.0.0.2")
	for i := range 400 {
		z.dns.Add(t, fmt.Sprintf("_25._tcp.mx.example.test. 300 IN TLSA %d 1 1 %064x", i%5, i))
	}
	z.dns.Secure("mx.example.test", "_25._tcp.mx.example.test")
	h := z.lookup("mx.example.test", true)
	wantDANE(t, h, "mx.example.test")
	if len(h.Records) != 400 {
		t.Errorf("%d records", len(h.Records))
	}
}

// Bad input: a CNAME loop at the TLSA owner is a failed lookup in a secure
// zone (tlsa-invalid), not an absence of records.
func TestCNAMELoopAtTheTLSAOwner(t *testing.T) {
	z := newZone(t,
		"mx.example.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx.example.test. 300 IN CNAME loop.example.test.",
		"loop.example.test. 300 IN CNAME _25._tcp.mx.example.test.")
	z.dns.Secure("mx.example.test", "_25._tcp.mx.example.test", "loop.example.test")
	r := z.lookup("mx.example.test", true).Requirement
	if !r.Excluded() || r.SkipResultType() != policy.ResultTLSAInvalid || !strings.Contains(r.Skip, "CNAME chain too long or looping") {
		t.Fatalf("requirement %+v, want a tlsa-invalid Skip", r)
	}
}

func TestDomainsLimitWhereDANEApplies(t *testing.T) {
	z := newZone(t,
		"mx.example.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx.example.test. 300 IN TLSA 3 1 1 "+hashA)
	z.dns.Secure("mx.example.test", "_25._tcp.mx.example.test")
	src, _ := New(Options{Resolver: z.res, Only: func(d string) bool { return d == "other.test" }})
	mxs := []policy.MX{z.mx("mx.example.test", true)}
	reqs, err := src.Requirements(t.Context(), "example.test", mxs)
	if err != nil || reqs[0].Policy != nil || z.tlsaQueries("mx.example.test") != 0 {
		t.Fatalf("DANE applied outside its domains: %+v, %v", reqs, err)
	}
	src, _ = New(Options{Resolver: z.res, Only: func(d string) bool { return d == "example.test" }})
	reqs, err = src.Requirements(t.Context(), "Example.Test.", mxs)
	if err != nil || reqs[0].DANE == nil {
		t.Fatalf("DANE did not apply to a listed domain: %+v, %v", reqs, err)
	}
}

func TestCancelledLookupIsNoHostOutcome(t *testing.T) {
	z := newZone(t, "mx.example.test. 300 IN A 127.0.0.2")
	z.dns.Secure("mx.example.test")
	mx := z.mx("mx.example.test", true)
	z.dns.SetDelay("_25._tcp.mx.example.test", time.Second)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := z.src.Requirements(ctx, "example.test", []policy.MX{mx}); err == nil {
		t.Fatal("a cancelled lookup gave requirements")
	}
}

func TestWildcardIsTheWholeLeftMostLabel(t *testing.T) {
	for _, tc := range []struct {
		id, name string
		want     bool
	}{
		{"mx.example.test", "mx.example.test", true},
		{"*.example.test", "mx.example.test", true},
		{"*.example.test", "a.mx.example.test", false},
		{"*.example.test", "example.test", false},
		{"m*.example.test", "mx.example.test", false},
		{"*.*.test", "a.b.test", false},
		{"*.", "mx.", false},
	} {
		if got := matchID(tc.id, tc.name); got != tc.want {
			t.Errorf("matchID(%q, %q) = %v", tc.id, tc.name, got)
		}
	}
}

// A route's port is the port of the TLSA owner name (RFC 7672 §3).
func TestTLSAOwnerFollowsThePort(t *testing.T) {
	z := newZone(t,
		"mx.example.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx.example.test. 300 IN TLSA 3 1 1 "+strings.Repeat("bb", 32),
		"_587._tcp.mx.example.test. 300 IN TLSA 3 1 1 "+hashA)
	z.dns.Secure("mx.example.test", "_25._tcp.mx.example.test", "_587._tcp.mx.example.test")
	mx := z.mx("mx.example.test", true)
	mx.Port = 587
	h := z.src.Lookup(t.Context(), "example.test", mx)
	wantDANE(t, h, "mx.example.test")
	if h.Requirement.Policy.Strings[0] != "3 1 1 "+hashA || z.tlsaQueries("mx.example.test") != 0 {
		t.Errorf("records %q, want those at _587._tcp", h.Requirement.Policy.Strings)
	}
}

// Requirements leaves out the steps of a lookup unless it logs them; what
// it decides must not depend on that.
func TestRequirementsDecideAsLookupWithOrWithoutDebugLog(t *testing.T) {
	z := newZone(t,
		"mx.example.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx.example.test. 300 IN TLSA 3 1 1 "+hashA,
		"plain.example.test. 300 IN A 127.0.0.3")
	z.dns.Secure("mx.example.test", "_25._tcp.mx.example.test", "plain.example.test", "_25._tcp.plain.example.test")
	mxs := []policy.MX{z.mx("mx.example.test", true), z.mx("mx.example.test", false), z.mx("plain.example.test", true)}
	var logged strings.Builder
	debug, err := New(Options{Resolver: z.res, Logger: slog.New(slog.NewTextHandler(&logged, &slog.HandlerOptions{Level: slog.LevelDebug}))})
	if err != nil {
		t.Fatal(err)
	}
	for _, src := range []*Source{z.src, debug} {
		reqs, err := src.Requirements(t.Context(), "example.test", mxs)
		if err != nil {
			t.Fatal(err)
		}
		for i, mx := range mxs {
			want := z.src.Lookup(t.Context(), "example.test", mx).Requirement
			got := reqs[i]
			if got.Label() != want.Label() || got.Security != want.Security || got.ServerName != want.ServerName ||
				!slices.Equal(got.Names, want.Names) || got.Skip != want.Skip || (got.DANE == nil) != (want.DANE == nil) {
				t.Errorf("host %d: Requirements gave %+v, Lookup %+v", i, got, want)
			}
		}
	}
	for _, note := range []string{"TLS authenticated by DANE required", "MX records not DNSSEC-validated",
		"no DNSSEC-validated TLSA records at plain.example.test"} {
		if !strings.Contains(logged.String(), note) {
			t.Errorf("debug log lacks %q:\n%s", note, logged.String())
		}
	}
}
