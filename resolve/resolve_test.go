package resolve

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/dnstest"
)

func newResolver(t *testing.T, servers ...*dnstest.Server) *Resolver {
	t.Helper()
	var addrs []string
	for _, s := range servers {
		addrs = append(addrs, s.Addr)
	}
	r, err := New(Config{Servers: addrs, Timeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func lookupErr(t *testing.T, err error) *Error {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) is not a *resolve.Error", err, err)
	}
	return e
}

func TestLookupFollowsCNAMEChain(t *testing.T) {
	s := dnstest.New(t,
		"mx.example.com. 300 IN CNAME a.provider.net.",
		"a.provider.net. 300 IN CNAME b.provider.net.",
		"b.provider.net. 300 IN A 192.0.2.1")
	res, err := newResolver(t, s).Lookup(t.Context(), "MX.example.com", dns.TypeA)
	if err != nil {
		t.Fatal(err)
	}
	if res.Name != "mx.example.com." || res.Final != "b.provider.net." ||
		!slices.Equal(res.CNAMEs, []string{"a.provider.net.", "b.provider.net."}) {
		t.Errorf("got Name %q Final %q CNAMEs %q", res.Name, res.Final, res.CNAMEs)
	}
	if len(res.Records) != 1 || res.Records[0].(*dns.A).A.String() != "192.0.2.1" {
		t.Errorf("records %v, want the A record of the final name", res.Records)
	}
}

func TestLookupCNAMELoopIsATemporaryError(t *testing.T) {
	s := dnstest.New(t,
		"a.example.com. 300 IN CNAME b.example.com.",
		"b.example.com. 300 IN CNAME a.example.com.")
	_, err := newResolver(t, s).Lookup(t.Context(), "a.example.com", dns.TypeA)
	e := lookupErr(t, err)
	if e.NotFound || !e.Temporary() || !strings.Contains(err.Error(), "CNAME chain too long or looping") {
		t.Errorf("err = %v, want a temporary CNAME loop error", err)
	}
}

func TestLookupAbsurdCNAMEChainIsBounded(t *testing.T) {
	var recs []string
	for i := range 12 {
		recs = append(recs, fmt.Sprintf("c%d.example.com. 300 IN CNAME c%d.example.com.", i, i+1))
	}
	recs = append(recs, "c12.example.com. 300 IN A 192.0.2.1")
	s := dnstest.New(t, recs...)
	_, err := newResolver(t, s).Lookup(t.Context(), "c0.example.com", dns.TypeA)
	if e := lookupErr(t, err); e.NotFound || !strings.Contains(err.Error(), "too long") {
		t.Errorf("err = %v, want a chain-too-long error", err)
	}

	// A chain of maxCNAMEs aliases is still fine.
	res, err := newResolver(t, s).Lookup(t.Context(), fmt.Sprintf("c%d.example.com", 12-maxCNAMEs), dns.TypeA)
	if err != nil || len(res.CNAMEs) != maxCNAMEs {
		t.Errorf("chain of %d: %v, %v", maxCNAMEs, res, err)
	}
}

func TestLookupCNAMEQuestionIsNotFollowed(t *testing.T) {
	s := dnstest.New(t,
		"a.example.com. 300 IN CNAME b.example.com.",
		"b.example.com. 300 IN A 192.0.2.1")
	res, err := newResolver(t, s).Lookup(t.Context(), "a.example.com", dns.TypeCNAME)
	if err != nil || len(res.Records) != 1 || res.Final != "a.example.com." {
		t.Errorf("got %+v, %v; want the CNAME record itself", res, err)
	}
}

func TestTruncatedAnswerIsRetriedOverTCP(t *testing.T) {
	s := dnstest.New(t, "example.com. 300 IN MX 10 mx.example.com.")
	s.SetFault("example.com", dns.TypeMX, dnstest.FaultTruncate)
	mxs, _, err := newResolver(t, s).MX(t.Context(), "example.com")
	if err != nil || len(mxs) != 1 || mxs[0].Mx != "mx.example.com." {
		t.Fatalf("MX = %v, %v; want the record, fetched over TCP", mxs, err)
	}
	if n := s.Queries("example.com", dns.TypeMX); n != 2 {
		t.Errorf("%d queries, want 2 (UDP truncated, then TCP)", n)
	}
}

func TestServerFailuresAreTemporary(t *testing.T) {
	for _, tc := range []struct {
		fault dnstest.Fault
		rcode int
		text  string
	}{
		{dnstest.FaultServfail, dns.RcodeServerFailure, "SERVFAIL"},
		{dnstest.FaultRefused, dns.RcodeRefused, "REFUSED"},
		{dnstest.FaultDrop, -1, "timeout"},
		{dnstest.FaultGarbage, -1, "MX lookup for example.com"},
	} {
		t.Run(tc.text, func(t *testing.T) {
			s := dnstest.New(t, "example.com. 300 IN MX 10 mx.example.com.")
			s.SetFault("example.com", 0, tc.fault)
			start := time.Now()
			_, _, err := newResolver(t, s).MX(t.Context(), "example.com")
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("took %v with a 300ms timeout", d)
			}
			e := lookupErr(t, err)
			if e.NotFound || !e.Temporary() || IsNotFound(err) || e.Rcode != tc.rcode || !strings.Contains(err.Error(), tc.text) {
				t.Errorf("err = %v (rcode %d), want temporary, rcode %d, mentioning %q", err, e.Rcode, tc.rcode, tc.text)
			}
		})
	}
}

func TestNXDOMAINIsNotFound(t *testing.T) {
	s := dnstest.New(t, "example.com. 300 IN MX 10 mx.example.com.")
	_, _, err := newResolver(t, s).MX(t.Context(), "nowhere.example.net")
	if !IsNotFound(err) || lookupErr(t, err).Temporary() {
		t.Errorf("err = %v, want NotFound", err)
	}
	if !strings.Contains(err.Error(), "NXDOMAIN") {
		t.Errorf("err = %q, want it to say NXDOMAIN", err)
	}
}

func TestNODATAIsAnEmptyResult(t *testing.T) {
	s := dnstest.New(t, "example.com. 300 IN A 192.0.2.1")
	mxs, _, err := newResolver(t, s).MX(t.Context(), "example.com")
	if err != nil || len(mxs) != 0 {
		t.Errorf("MX = %v, %v; want none and no error", mxs, err)
	}
	// An empty non-terminal exists too.
	s.Add(t, "a.b.example.com. 300 IN A 192.0.2.2")
	if _, _, err := newResolver(t, s).MX(t.Context(), "b.example.com"); err != nil {
		t.Errorf("empty non-terminal: %v", err)
	}
}

func TestCacheHonoursTTL(t *testing.T) {
	s := dnstest.New(t, "example.com. 60 IN MX 10 mx.example.com.")
	r := newResolver(t, s)
	now := time.Now()
	var mu sync.Mutex
	r.now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }

	for range 3 {
		if _, _, err := r.MX(t.Context(), "example.com"); err != nil {
			t.Fatal(err)
		}
	}
	if n := s.Queries("example.com", dns.TypeMX); n != 1 {
		t.Errorf("%d queries within the TTL, want 1", n)
	}
	advance(59 * time.Second)
	r.MX(t.Context(), "example.com")
	if n := s.Queries("example.com", dns.TypeMX); n != 1 {
		t.Errorf("%d queries at 59s of a 60s TTL, want 1", n)
	}
	advance(2 * time.Second)
	r.MX(t.Context(), "example.com")
	if n := s.Queries("example.com", dns.TypeMX); n != 2 {
		t.Errorf("%d queries after the TTL, want 2", n)
	}
}

func TestCachedRecordsChangeWhenTheTTLRunsOut(t *testing.T) {
	s := dnstest.New(t, "mx.example.com. 60 IN A 192.0.2.1")
	r := newResolver(t, s)
	now := time.Now()
	r.now = func() time.Time { return now }
	addrs := func() []netip.Addr {
		t.Helper()
		got, _, err := r.Addrs(t.Context(), "mx.example.com", IPv4)
		if err != nil {
			t.Fatal(err)
		}
		return got
	}
	if got := addrs(); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("192.0.2.1")}) {
		t.Fatalf("addrs %v, want 192.0.2.1", got)
	}
	s.Remove("mx.example.com.", dns.TypeA)
	s.Add(t, "mx.example.com. 60 IN A 192.0.2.2")
	if got := addrs(); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("192.0.2.1")}) {
		t.Errorf("addrs within the TTL %v, want the cached 192.0.2.1", got)
	}
	now = now.Add(61 * time.Second)
	if got := addrs(); !slices.Equal(got, []netip.Addr{netip.MustParseAddr("192.0.2.2")}) {
		t.Errorf("addrs after the TTL %v, want the new 192.0.2.2", got)
	}
}

func TestAppendingToResultRecordsLeavesOtherResultsAlone(t *testing.T) {
	s := dnstest.New(t,
		"mx.example.com. 300 IN A 192.0.2.1",
		"mx.example.com. 300 IN A 192.0.2.2",
		"mx.example.com. 300 IN A 192.0.2.3")
	r := newResolver(t, s)
	lookup := func() *Result {
		t.Helper()
		res, err := r.Lookup(t.Context(), "mx.example.com", dns.TypeA)
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	extra := func(ip string) dns.RR {
		return &dns.A{Hdr: dns.RR_Header{Name: "mx.example.com.", Rrtype: dns.TypeA, Class: dns.ClassINET}, A: net.ParseIP(ip)}
	}
	a, b := lookup(), lookup()
	a.Records = append(a.Records, extra("198.51.100.1"))
	b.Records = append(b.Records, extra("198.51.100.2"))
	if got := a.Records[3].(*dns.A).A.String(); got != "198.51.100.1" {
		t.Errorf("a caller's appended record became %s through another's append, want 198.51.100.1", got)
	}
	if n := len(lookup().Records); n != 3 {
		t.Errorf("%d cached records after callers appended, want 3", n)
	}
}

func TestCacheKeepsNegativeAnswersButNotFailures(t *testing.T) {
	s := dnstest.New(t, "example.com. 300 IN A 192.0.2.1")
	r := newResolver(t, s)
	for range 2 {
		r.MX(t.Context(), "nowhere.example.com") // NXDOMAIN, SOA minimum 60s
		r.MX(t.Context(), "example.com")         // NODATA
	}
	if n := s.Queries("nowhere.example.com", dns.TypeMX) + s.Queries("example.com", dns.TypeMX); n != 2 {
		t.Errorf("%d queries for two negative answers asked twice, want 2", n)
	}
	s.SetFault("broken.example.com", 0, dnstest.FaultServfail)
	r.MX(t.Context(), "broken.example.com")
	r.MX(t.Context(), "broken.example.com")
	if n := s.Queries("broken.example.com", dns.TypeMX); n != 2 {
		t.Errorf("%d queries for a SERVFAIL asked twice, want 2 (failures are not cached)", n)
	}
}

func TestCacheTTLIsCappedForHugeTTLs(t *testing.T) {
	s := dnstest.New(t, "example.com. 2147483647 IN MX 10 mx.example.com.")
	r := newResolver(t, s)
	now := time.Now()
	r.now = func() time.Time { return now }
	r.MX(t.Context(), "example.com")
	now = now.Add(maxTTL + time.Second)
	r.MX(t.Context(), "example.com")
	if n := s.Queries("example.com", dns.TypeMX); n != 2 {
		t.Errorf("%d queries, want 2: a cached answer must expire after %v", n, maxTTL)
	}
}

func TestADBitMakesResultSecure(t *testing.T) {
	s := dnstest.New(t,
		"example.com. 300 IN MX 10 mx.example.com.",
		"mx.example.com. 300 IN CNAME mx.provider.net.",
		"mx.provider.net. 300 IN A 192.0.2.1")
	r := newResolver(t, s)
	if _, secure, _ := r.MX(t.Context(), "example.com"); secure {
		t.Error("insecure MX answer reported secure")
	}
	s.Secure("example.com", "mx.example.com")
	r = newResolver(t, s)
	if _, secure, err := r.MX(t.Context(), "example.com"); !secure || err != nil {
		t.Errorf("secure MX answer: secure=%t err=%v; want secure (DO bit sent, AD bit read)", secure, err)
	}
	// The CNAME target is insecure, so the chain is.
	if res, _ := r.Lookup(t.Context(), "mx.example.com", dns.TypeA); res == nil || res.Secure {
		t.Errorf("chain through an insecure name reported secure: %+v", res)
	}
	s.Secure("mx.provider.net")
	r = newResolver(t, s)
	if res, _ := r.Lookup(t.Context(), "mx.example.com", dns.TypeA); res == nil || !res.Secure {
		t.Errorf("all-secure chain reported insecure: %+v", res)
	}
}

// AliasSigned: the first CNAME of a chain came with its RRSIG, so the
// zone of the name asked for is signed, though the chain ends in an
// unsigned one; a later alias's signature does not count.
func TestAliasSignedSpeaksOfTheFirstCNAMEsZone(t *testing.T) {
	s := dnstest.New(t,
		"mx.example.com. 300 IN CNAME mx.provider.net.",
		"mx.provider.net. 300 IN CNAME lb.provider.net.",
		"lb.provider.net. 300 IN A 192.0.2.1")
	s.Secure("mx.provider.net")
	_, res, err := newResolver(t, s).Addrs(t.Context(), "mx.example.com", IPv4)
	if err != nil || res.AliasSigned || res.Secure {
		t.Fatalf("unsigned first alias: %+v, %v; want neither signed nor secure", res, err)
	}
	s.Secure("mx.example.com")
	_, res, err = newResolver(t, s).Addrs(t.Context(), "mx.example.com", IPv4)
	if err != nil || !res.AliasSigned || res.Secure {
		t.Fatalf("signed first alias: %+v, %v; want signed, not secure (the chain ends unsigned)", res, err)
	}
}

func TestAddrsOrderAndFamilies(t *testing.T) {
	s := dnstest.New(t,
		"mx.example.com. 300 IN A 192.0.2.1",
		"mx.example.com. 300 IN AAAA 2001:db8::1",
		"v4only.example.com. 300 IN A 192.0.2.2")
	r := newResolver(t, s)
	for _, tc := range []struct {
		host    string
		version IPVersion
		want    []string
	}{
		{"mx.example.com", IPBoth, []string{"2001:db8::1", "192.0.2.1"}},
		{"mx.example.com", IPv4, []string{"192.0.2.1"}},
		{"mx.example.com", IPv6, []string{"2001:db8::1"}},
		{"v4only.example.com", IPBoth, []string{"192.0.2.2"}},
		{"v4only.example.com", IPv6, nil},
	} {
		addrs, _, err := r.Addrs(t.Context(), tc.host, tc.version)
		if err != nil {
			t.Errorf("%s/%d: %v", tc.host, tc.version, err)
			continue
		}
		var got []string
		for _, a := range addrs {
			got = append(got, a.String())
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s/%d: %v, want %v", tc.host, tc.version, got, tc.want)
		}
	}
}

func TestAddrsOneFamilyFailingIsNotAnError(t *testing.T) {
	// The AAAA lookup fails (a validating resolver's SERVFAIL, which is
	// what a forged answer becomes); the A answer is validated. The
	// addresses returned are secure: counting the failure as "insecure"
	// would let the forger turn DANE off.
	s := dnstest.New(t, "mx.example.com. 300 IN A 192.0.2.1")
	s.Secure("mx.example.com")
	s.SetFault("mx.example.com", dns.TypeAAAA, dnstest.FaultServfail)
	addrs, res, err := newResolver(t, s).Addrs(t.Context(), "mx.example.com", IPBoth)
	if err != nil || !slices.Equal(addrs, []netip.Addr{netip.MustParseAddr("192.0.2.1")}) {
		t.Fatalf("Addrs = %v, %v; want the IPv4 address", addrs, err)
	}
	if !res.Secure {
		t.Error("validated IPv4 addresses reported insecure because the AAAA lookup failed")
	}
	s.SetFault("mx.example.com", dns.TypeA, dnstest.FaultServfail)
	if _, _, err := newResolver(t, s).Addrs(t.Context(), "mx.example.com", IPBoth); err == nil {
		t.Error("no error although both families failed")
	}
	// An insecure zone stays insecure with one family failing.
	u := dnstest.New(t, "mx.example.net. 300 IN A 192.0.2.2")
	u.SetFault("mx.example.net", dns.TypeAAAA, dnstest.FaultServfail)
	if _, res, err := newResolver(t, u).Addrs(t.Context(), "mx.example.net", IPBoth); err != nil || res.Secure {
		t.Errorf("unsigned zone: %+v, %v; want its address, not secure", res, err)
	}
}

func TestAddrsFailureOfOneFamilyWithNoDataInTheOtherIsTemporary(t *testing.T) {
	// Only an AAAA lookup works, and it says "no such record"; the A lookup
	// fails. The host may have IPv4 addresses: that must not read as none.
	s := dnstest.New(t, "mx.example.com. 300 IN TXT \"exists\"")
	s.SetFault("mx.example.com", dns.TypeA, dnstest.FaultServfail)
	addrs, _, err := newResolver(t, s).Addrs(t.Context(), "mx.example.com", IPBoth)
	if err == nil || IsNotFound(err) {
		t.Fatalf("Addrs = %v, %v; want a temporary error", addrs, err)
	}
}

func TestTXTConcatenatesStrings(t *testing.T) {
	s := dnstest.New(t, `_mta-sts.example.com. 300 IN TXT "v=STSv1; " "id=2024"`)
	txts, _, err := newResolver(t, s).TXT(t.Context(), "_mta-sts.example.com")
	if err != nil || !slices.Equal(txts, []string{"v=STSv1; id=2024"}) {
		t.Errorf("TXT = %q, %v", txts, err)
	}
}

func TestNextServerAskedAfterServfail(t *testing.T) {
	bad := dnstest.New(t)
	bad.SetFault("example.com", 0, dnstest.FaultServfail)
	good := dnstest.New(t, "example.com. 300 IN MX 10 mx.example.com.")
	good.Secure("example.com")
	mxs, secure, err := newResolver(t, bad, good).MX(t.Context(), "example.com")
	if err != nil || len(mxs) != 1 || !secure {
		t.Errorf("MX = %v, %v, %v; want the second server's validated answer", mxs, secure, err)
	}
}

func TestUnvalidatedAnswerDoesNotOverrideServfail(t *testing.T) {
	// A validating resolver says SERVFAIL to a forged TLSA RRset; a second
	// resolver that does not validate hands the forgery on without AD.
	// Taken, it would read as "insecure, DANE does not apply".
	records := []string{"_25._tcp.mx.example.com. 300 IN TLSA 3 1 1 " + strings.Repeat("aa", 32)}
	validating := dnstest.New(t, records...)
	validating.SetFault("_25._tcp.mx.example.com", dns.TypeTLSA, dnstest.FaultServfail)
	plain := dnstest.New(t, records...)
	_, _, err := newResolver(t, validating, plain).TLSA(t.Context(), "_25._tcp.mx.example.com")
	var e *Error
	if !errors.As(err, &e) || e.Rcode != dns.RcodeServerFailure {
		t.Errorf("TLSA lookup: %v; want the first server's SERVFAIL", err)
	}
	// REFUSED says nothing of the data: the next server's answer stands.
	refusing := dnstest.New(t)
	refusing.SetFault("_25._tcp.mx.example.com", 0, dnstest.FaultRefused)
	if rrs, _, err := newResolver(t, refusing, plain).TLSA(t.Context(), "_25._tcp.mx.example.com"); err != nil || len(rrs) != 1 {
		t.Errorf("after REFUSED: %v, %v; want the next server's answer", rrs, err)
	}
	// Nor does NOTIMP, a server that does not do the query type.
	notimp := dnstest.New(t)
	notimp.SetFault("_25._tcp.mx.example.com", 0, dnstest.FaultNotImp)
	if rrs, _, err := newResolver(t, notimp, plain).TLSA(t.Context(), "_25._tcp.mx.example.com"); err != nil || len(rrs) != 1 {
		t.Errorf("after NOTIMP: %v, %v; want the next server's answer", rrs, err)
	}
}

func TestNegativeAnswerBehindCNAMEIsCachedAsNegative(t *testing.T) {
	// RFC 2308 §3, §5: NXDOMAIN after a CNAME is a negative answer, cached
	// no longer than its SOA allows, not for the alias's day-long TTL.
	s := dnstest.New(t,
		"_25._tcp.mx.example.com. 86400 IN CNAME _25._tcp.mx.provider.net.",
		"mx.provider.net. 300 IN A 192.0.2.1")
	r := newResolver(t, s)
	now := time.Now()
	r.now = func() time.Time { return now }
	if _, _, err := r.TLSA(t.Context(), "_25._tcp.mx.example.com"); !IsNotFound(err) {
		t.Fatalf("first lookup: %v, want NXDOMAIN", err)
	}
	s.Add(t, "_25._tcp.mx.provider.net. 300 IN TLSA 3 1 1 "+strings.Repeat("aa", 32))
	now = now.Add(negativeTTL + time.Second)
	if rrs, _, err := r.TLSA(t.Context(), "_25._tcp.mx.example.com"); err != nil || len(rrs) != 1 {
		t.Errorf("after the negative TTL: %d records, %v; want the record published since", len(rrs), err)
	}
}

func TestCancelledContextEndsLookup(t *testing.T) {
	s := dnstest.New(t)
	s.SetFault("example.com", 0, dnstest.FaultDrop)
	r, err := New(Config{Servers: []string{s.Addr}, Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, _, err := r.MX(ctx, "example.com"); err == nil {
		t.Error("no error")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("lookup took %v after its context ended", d)
	}
}

func TestNewRejectsBadServerAddress(t *testing.T) {
	if _, err := New(Config{Servers: []string{"127.0.0.1"}}); err == nil {
		t.Error("accepted a server without a port")
	}
}

func TestLookupRejectsInvalidName(t *testing.T) {
	s := dnstest.New(t)
	if _, err := newResolver(t, s).Lookup(t.Context(), strings.Repeat("a", 64)+".com", dns.TypeA); err == nil {
		t.Error("accepted a 64-byte label")
	}
}

func TestConcurrentLookupsShareOneQueryAndSurviveACancelledCaller(t *testing.T) {
	s := dnstest.New(t, "slow.example. 300 IN A 192.0.2.7")
	s.SetDelay("slow.example", 150*time.Millisecond)
	r := newResolver(t, s)

	first, cancel := context.WithCancel(t.Context())
	firstErr := make(chan error, 1)
	go func() {
		_, err := r.Lookup(first, "slow.example", dns.TypeA)
		firstErr <- err
	}()
	time.Sleep(30 * time.Millisecond) // the first caller's query is on the wire
	second := make(chan error, 1)
	go func() {
		res, err := r.Lookup(t.Context(), "slow.example", dns.TypeA)
		if err == nil && len(res.Records) != 1 {
			err = fmt.Errorf("records %v", res.Records)
		}
		second <- err
	}()
	time.Sleep(30 * time.Millisecond)
	cancel()
	if err := <-firstErr; !errors.Is(err, context.Canceled) {
		t.Errorf("cancelled caller: err = %v, want context.Canceled", err)
	}
	if err := <-second; err != nil {
		t.Fatalf("the other caller failed because the first gave up: %v", err)
	}
	if n := s.Queries("slow.example", dns.TypeA); n != 1 {
		t.Errorf("%d queries sent, want 1 shared", n)
	}
}

func TestTLSARecordsWithTheirSecurity(t *testing.T) {
	s := dnstest.New(t,
		"_25._tcp.mx.example.com. 300 IN TLSA 3 1 1 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
		"_25._tcp.mx.example.com. 300 IN TLSA 2 0 1 fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210")
	s.Secure("_25._tcp.mx.example.com")
	recs, res, err := newResolver(t, s).TLSA(t.Context(), "_25._tcp.mx.example.com")
	if err != nil || len(recs) != 2 || !res.Secure {
		t.Fatalf("TLSA = %v, %+v, %v; want two secure records", recs, res, err)
	}
	if recs[0].Usage != 3 || recs[0].Selector != 1 || recs[0].MatchingType != 1 {
		t.Errorf("first record %v, want 3 1 1", recs[0])
	}
}

// Hundreds of records do not fit a UDP answer: the server truncates, the
// client asks again over TCP and gets them all.
func TestLargeTLSARRsetComesOverTCP(t *testing.T) {
	s := dnstest.New(t)
	for i := range 300 {
		s.Add(t, fmt.Sprintf("_25._tcp.mx.example.com. 300 IN TLSA 3 1 1 %064x", i))
	}
	recs, _, err := newResolver(t, s).TLSA(t.Context(), "_25._tcp.mx.example.com")
	if err != nil || len(recs) != 300 {
		t.Fatalf("got %d records, %v; want 300", len(recs), err)
	}
	if n := s.Queries("_25._tcp.mx.example.com", dns.TypeTLSA); n != 2 {
		t.Errorf("%d queries, want 2 (UDP truncated, then TCP)", n)
	}
}

// An answer counts only if it answers the question asked (RFC 1035
// §4.1.1, §7.3; RFC 5452 §9.1): an echoed query, which has AD set, would
// read as a secure "no TLSA records" and turn DANE off, and an NXDOMAIN
// for another name as a bounce for this one.
func TestAnswersToAnotherQuestionAreNoAnswers(t *testing.T) {
	s := dnstest.New(t, "example.com. 300 IN MX 10 mx.example.com.")
	s.SetFault("_25._tcp.mx.example.com", dns.TypeTLSA, dnstest.FaultEcho)
	s.SetFault("example.com", dns.TypeMX, dnstest.FaultWrongQuestion)
	r := newResolver(t, s)
	if rrs, res, err := r.TLSA(t.Context(), "_25._tcp.mx.example.com"); err == nil {
		t.Errorf("an echoed query read as an answer: %d records, %+v", len(rrs), res)
	}
	if _, _, err := r.MX(t.Context(), "example.com"); err == nil || IsNotFound(err) {
		t.Errorf("an NXDOMAIN for another name: %v, want a temporary error", err)
	}
}

// Records of a class other than IN answer no question of ours.
func TestRecordsOfAnotherClassAreIgnored(t *testing.T) {
	s := dnstest.New(t, "example.com. 300 IN MX 10 mx.example.com.")
	s.AddRR(&dns.MX{Hdr: dns.RR_Header{Name: "example.com.", Rrtype: dns.TypeMX, Class: dns.ClassCHAOS, Ttl: 300},
		Preference: 1, Mx: "evil.example."})
	mxs, _, err := newResolver(t, s).MX(t.Context(), "example.com")
	if err != nil || len(mxs) != 1 || mxs[0].Mx != "mx.example.com." {
		t.Errorf("MX = %v, %v; want the IN record alone", mxs, err)
	}
}

// TC set on a datagram cut inside a record (a proxy that truncates by
// bytes) still means asking again over TCP (RFC 7766 §5).
func TestTruncatedAnswerThatDoesNotUnpackIsAskedOverTCP(t *testing.T) {
	var records []string
	for i := range 40 {
		records = append(records, fmt.Sprintf("big.example.com. 300 IN A 192.0.2.%d", i+1))
	}
	s := dnstest.New(t, records...)
	s.SetFault("big.example.com", dns.TypeA, dnstest.FaultCutTruncate)
	addrs, _, err := newResolver(t, s).Addrs(t.Context(), "big.example.com", IPv4)
	if err != nil || len(addrs) != 40 {
		t.Errorf("Addrs = %d addresses, %v; want all 40 over TCP", len(addrs), err)
	}
}

// RFC 2181 §8: a TTL with its top bit set is 0, and is not cached.
func TestTTLWithTheTopBitSetIsZero(t *testing.T) {
	m := new(dns.Msg)
	m.Answer = []dns.RR{&dns.A{Hdr: dns.RR_Header{Name: "x.example.", Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 0x80000000}}}
	if d := cacheTTL(m, dns.TypeA); d != 0 {
		t.Errorf("cached for %v, want not at all", d)
	}
}

// A datagram lost once is asked for again before the lookup fails: with
// a single nameserver, one lost packet would otherwise defer the mail.
func TestLostDatagramIsAskedForAgain(t *testing.T) {
	s := dnstest.New(t, "example.com. 300 IN MX 10 mx.example.com.")
	s.SetFault("example.com", dns.TypeMX, dnstest.FaultDropFirst)
	mxs, _, err := newResolver(t, s).MX(t.Context(), "example.com")
	if err != nil || len(mxs) != 1 {
		t.Errorf("MX = %v, %v; want the answer to the second datagram", mxs, err)
	}
}

func TestFailureBehindCNAMENamesTheChainsEnd(t *testing.T) {
	// RFC 6604 §3: the response code speaks of the chain's last name.
	// An operator reading "NXDOMAIN" for an MX name that exists looks in
	// the wrong zone unless the error names the provider's name.
	s := dnstest.New(t,
		"mx.example.com. 300 IN CNAME mx.provider.net.")
	r := newResolver(t, s)

	_, err := r.Lookup(t.Context(), "mx.example.com", dns.TypeA)
	if !IsNotFound(err) || !strings.Contains(err.Error(), "A lookup for mx.example.com: NXDOMAIN at mx.provider.net") {
		t.Errorf("NXDOMAIN behind a CNAME: %v", err)
	}
	// Without an alias the error stays as it was.
	_, err = r.Lookup(t.Context(), "nowhere.example.com", dns.TypeA)
	if !IsNotFound(err) || err.Error() != "A lookup for nowhere.example.com: NXDOMAIN" {
		t.Errorf("NXDOMAIN without a CNAME: %v", err)
	}
}
