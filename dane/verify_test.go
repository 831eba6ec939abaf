package dane

import (
	"crypto/x509"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/testpki"
	"github.com/stsrelay/stsrelay/policy"
)

// tlsa parses record data "u s m hex" into a TLSA RR.
func tlsa(t *testing.T, data string) *dns.TLSA {
	t.Helper()
	rr, err := dns.NewRR("_25._tcp.mx.example.test. 300 IN TLSA " + data)
	if err != nil {
		t.Fatal(err)
	}
	return rr.(*dns.TLSA)
}

func auth(t *testing.T, data ...string) *Authenticator {
	t.Helper()
	var rrs []*dns.TLSA
	for _, d := range data {
		rrs = append(rrs, tlsa(t, d))
	}
	return NewAuthenticator(Records(rrs), []string{"mx.example.test", "example.test"})
}

func chainOf(certs ...[]byte) []*x509.Certificate {
	var out []*x509.Certificate
	for _, der := range certs {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			panic(err)
		}
		out = append(out, c)
	}
	return out
}

// RFC 7672 §3.1.1, §3.2.1: DANE-EE binds the key; the name and dates of
// the certificate do not matter.
func TestDANEEEMatchesTheLeafWhateverItsNameAndDates(t *testing.T) {
	ca := testpki.NewCA(t)
	leaf := ca.IssueWith(t, testpki.Options{Expired: true, SelfSigned: true}, "some.other.name")
	chain := chainOf(leaf.Certificate...)
	for _, sm := range [][2]uint8{{0, 0}, {0, 1}, {0, 2}, {1, 0}, {1, 1}, {1, 2}} {
		a := auth(t, testpki.TLSA(leaf.Leaf, 3, sm[0], sm[1]))
		if f := a.Authenticate(chain, time.Now()); f != nil {
			t.Errorf("3 %d %d: %v", sm[0], sm[1], f)
		}
	}
}

func TestMismatchIsCertificateNotTrusted(t *testing.T) {
	ca := testpki.NewCA(t)
	leaf := ca.Issue(t, "mx.example.test")
	other := ca.Issue(t, "mx.example.test")
	f := auth(t, testpki.TLSA(other.Leaf, 3, 1, 1)).Authenticate(chainOf(leaf.Certificate...), time.Now())
	if f == nil || f.Result != policy.ResultCertificateNotTrusted || f.Reason != "TLSA records did not match the certificate" {
		t.Fatalf("got %+v, want certificate-not-trusted", f)
	}
	if f := auth(t, testpki.TLSA(leaf.Leaf, 3, 1, 1)).Authenticate(nil, time.Now()); f == nil {
		t.Fatal("an empty chain passed")
	}
}

// DANE-EE matches the leaf only: a record for the CA is no DANE-EE match.
func TestDANEEEDoesNotMatchTheIssuer(t *testing.T) {
	ca := testpki.NewCA(t)
	leaf := ca.WithChain(ca.Issue(t, "mx.example.test"))
	f := auth(t, testpki.TLSA(ca.Cert, 3, 1, 1)).Authenticate(chainOf(leaf.Certificate...), time.Now())
	if f == nil {
		t.Fatal("a DANE-EE record of the CA authenticated the leaf")
	}
}

// RFC 7672 §3.1.2, §3.2.2: DANE-TA is a trust anchor; the chain must lead
// to it and the leaf must name the host.
func TestDANETAChainsToTheAnchorWithNameChecks(t *testing.T) {
	ca := testpki.NewCA(t)
	now := time.Now()
	for _, tc := range []struct {
		name   string
		leaf   []string
		opts   testpki.Options
		chain  bool // send the CA certificate
		record string
		want   policy.ResultType
	}{
		{"SPKI digest, anchor sent", []string{"mx.example.test"}, testpki.Options{}, true, "2 1 1", policy.ResultSuccess},
		{"certificate digest, anchor sent", []string{"mx.example.test"}, testpki.Options{}, true, "2 0 1", policy.ResultSuccess},
		{"SHA-512", []string{"mx.example.test"}, testpki.Options{}, true, "2 0 2", policy.ResultSuccess},
		{"next-hop domain is a reference identifier", []string{"example.test"}, testpki.Options{}, true, "2 0 1", policy.ResultSuccess},
		{"wildcard as the whole left-most label", []string{"*.example.test"}, testpki.Options{}, true, "2 0 1", policy.ResultSuccess},
		{"CN when there is no DNS-ID", nil, testpki.Options{CommonName: "mx.example.test"}, true, "2 0 1", policy.ResultSuccess},
		{"anchor carried whole by the record", []string{"mx.example.test"}, testpki.Options{}, false, "2 0 0", policy.ResultSuccess},
		{"anchor not sent", []string{"mx.example.test"}, testpki.Options{}, false, "2 0 1", policy.ResultCertificateNotTrusted},
		{"wrong name", []string{"other.test"}, testpki.Options{}, true, "2 0 1", policy.ResultCertificateHostMismatch},
		{"wildcard matches one label, not zero", []string{"*.mx.example.test"}, testpki.Options{}, true, "2 0 1", policy.ResultCertificateHostMismatch},
		{"CN ignored when DNS-IDs exist", []string{"other.test"}, testpki.Options{CommonName: "mx.example.test"}, true, "2 0 1", policy.ResultCertificateHostMismatch},
		{"expired leaf", []string{"mx.example.test"}, testpki.Options{Expired: true}, true, "2 0 1", policy.ResultCertificateExpired},
		{"self-signed leaf", []string{"mx.example.test"}, testpki.Options{SelfSigned: true}, true, "2 0 1", policy.ResultCertificateNotTrusted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cert := ca.IssueWith(t, tc.opts, tc.leaf...)
			if tc.chain {
				cert = ca.WithChain(cert)
			}
			var sel, match uint8
			fmt.Sscanf(tc.record, "2 %d %d", &sel, &match)
			f := auth(t, testpki.TLSA(ca.Cert, 2, sel, match)).Authenticate(chainOf(cert.Certificate...), now)
			switch {
			case tc.want == policy.ResultSuccess && f != nil:
				t.Errorf("failed: %v", f)
			case tc.want != policy.ResultSuccess && (f == nil || f.Result != tc.want):
				t.Errorf("got %+v, want %s", f, tc.want)
			}
		})
	}
}

// RFC 7671 §9: per usage and selector only the strongest digest counts,
// so a weak digest left behind cannot be what authenticates.
func TestDigestAgilityIgnoresWeakerDigests(t *testing.T) {
	ca := testpki.NewCA(t)
	leaf := ca.Issue(t, "mx.example.test")
	other := ca.Issue(t, "mx.example.test")
	chain := chainOf(leaf.Certificate...)
	// SHA-256 matches, but a SHA-512 record for the same usage and
	// selector (of another key) makes it be ignored.
	if f := auth(t, testpki.TLSA(leaf.Leaf, 3, 1, 1), testpki.TLSA(other.Leaf, 3, 1, 2)).Authenticate(chain, time.Now()); f == nil {
		t.Error("a SHA-256 record authenticated beside a SHA-512 one")
	}
	// The other way round it passes.
	if f := auth(t, testpki.TLSA(other.Leaf, 3, 1, 1), testpki.TLSA(leaf.Leaf, 3, 1, 2)).Authenticate(chain, time.Now()); f != nil {
		t.Errorf("SHA-512 match failed: %v", f)
	}
	// Full(0) records always count; another selector is another group.
	if f := auth(t, testpki.TLSA(leaf.Leaf, 3, 1, 0), testpki.TLSA(other.Leaf, 3, 1, 2)).Authenticate(chain, time.Now()); f != nil {
		t.Errorf("Full(0) match ignored: %v", f)
	}
	if f := auth(t, testpki.TLSA(leaf.Leaf, 3, 0, 1), testpki.TLSA(other.Leaf, 3, 1, 2)).Authenticate(chain, time.Now()); f != nil {
		t.Errorf("selector 0 SHA-256 ignored because of a selector 1 SHA-512: %v", f)
	}
	recs := Records([]*dns.TLSA{tlsa(t, testpki.TLSA(leaf.Leaf, 3, 1, 1)), tlsa(t, testpki.TLSA(other.Leaf, 3, 1, 2))})
	if recs[0].Usable || !strings.Contains(recs[0].Why, "RFC 7671 §9") {
		t.Errorf("record %+v, want unusable by digest agility", recs[0])
	}
}

func TestUnusableRecords(t *testing.T) {
	hash := strings.Repeat("ab", 32)
	for data, why := range map[string]string{
		"0 1 1 " + hash:                    "PKIX-TA(0) is not used for SMTP",
		"1 1 1 " + hash:                    "PKIX-EE(1) is not used for SMTP",
		"4 1 1 " + hash:                    "unknown usage 4",
		"255 1 1 " + hash:                  "unknown usage 255",
		"3 2 1 " + hash:                    "unknown selector 2",
		"3 1 3 " + hash:                    "unknown matching type 3",
		"3 1 1 abcd":                       "malformed data (2 bytes, SHA2-256 needs 32)",
		"3 1 2 " + hash:                    "malformed data (32 bytes, SHA2-512 needs 64)",
		"3 1 1 " + hash + "00":             "malformed data (33 bytes",
		"2 0 1 " + strings.Repeat("0", 64): "",
	} {
		r := Records([]*dns.TLSA{tlsa(t, data)})[0]
		if why == "" {
			if !r.Usable {
				t.Errorf("%s: unusable (%s)", data, r.Why)
			}
			continue
		}
		if r.Usable || !strings.Contains(r.Why, why) {
			t.Errorf("%s: usable %v, why %q; want %q", data, r.Usable, r.Why, why)
		}
	}
	// Truncated RDATA arrives as a record with empty data (miekg/dns is
	// lenient): never a match for anything.
	r := Records([]*dns.TLSA{{Usage: 3}})[0]
	if r.Usable || r.Why != "malformed data (empty)" {
		t.Errorf("empty Full(0) record: %+v", r)
	}
	if NewAuthenticator([]Record{r}, nil) != nil {
		t.Error("an authenticator from unusable records alone")
	}
}

// A TLSA RRset with hundreds of records costs a handful of digests.
func TestManyRecordsAreMatchedWithoutRecomputing(t *testing.T) {
	ca := testpki.NewCA(t)
	leaf := ca.Issue(t, "mx.example.test")
	var data []string
	for i := range 500 {
		data = append(data, fmt.Sprintf("3 1 1 %064x", i))
	}
	data = append(data, testpki.TLSA(leaf.Leaf, 3, 1, 1))
	a := auth(t, data...)
	if f := a.Authenticate(chainOf(leaf.Certificate...), time.Now()); f != nil {
		t.Fatal(f)
	}
	m := newMatcher()
	for _, r := range a.ee {
		m.matches(leaf.Leaf, r)
	}
	if len(m.cache) != 1 {
		t.Errorf("%d digests computed for one certificate and one selector/matching pair", len(m.cache))
	}
}

func TestRecordStringIsThePolicyString(t *testing.T) {
	r := Records([]*dns.TLSA{tlsa(t, "3 1 1 "+strings.Repeat("AB", 32))})[0]
	if got := r.String(); got != "3 1 1 "+strings.Repeat("ab", 32) {
		t.Errorf("String() = %q", got)
	}
}

func host(t *testing.T, base string, data ...string) *Host {
	t.Helper()
	var rrs []*dns.TLSA
	for _, d := range data {
		rrs = append(rrs, tlsa(t, d))
	}
	h := &Host{Base: base, Records: Records(rrs)}
	h.Requirement, h.Note = requirement("example.test", policy.MX{Name: base}, base, h.Records)
	return h
}

func TestVerifyForCheckSaysWhatToPublish(t *testing.T) {
	ca := testpki.NewCA(t)
	leaf := ca.Issue(t, "mx.example.test")
	chain := chainOf(leaf.Certificate...)
	good := testpki.TLSA(leaf.Leaf, 3, 1, 1)

	v := host(t, "mx.example.test", "3 1 1 "+strings.Repeat("00", 32), good).Verify(chain, time.Now())
	if v.Failure != nil || len(v.Advice) != 0 || v.Matches[0] != -1 || v.Matches[1] != 0 {
		t.Errorf("matching RRset: %+v", v)
	}

	v = host(t, "mx.example.test", "3 1 1 "+strings.Repeat("00", 32)).Verify(chain, time.Now())
	if v.Failure == nil || len(v.Advice) != 1 || !strings.Contains(v.Advice[0], "_25._tcp.mx.example.test. IN TLSA "+good) {
		t.Errorf("mismatch: %+v", v)
	}

	// A DANE-TA record for a CA the server does not send.
	v = host(t, "mx.example.test", testpki.TLSA(ca.Cert, 2, 0, 1)).Verify(chain, time.Now())
	if v.Failure == nil || len(v.Advice) != 2 || !strings.Contains(v.Advice[1], "sends only its own certificate") {
		t.Errorf("DANE-TA without the chain: %+v", v)
	}

	v = host(t, "mx.example.test", "1 1 1 "+strings.Repeat("00", 32)).Verify(chain, time.Now())
	if v.Failure != nil || len(v.Advice) != 1 || !strings.Contains(v.Advice[0], "no TLSA record at _25._tcp.mx.example.test. is usable") {
		t.Errorf("unusable only: %+v", v)
	}
}
