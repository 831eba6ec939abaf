package delivery

import (
	"bufio"
	"crypto/tls"
	"net"
	"net/textproto"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/stsrelay/stsrelay/dane"
	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/internal/testpki"
	"github.com/stsrelay/stsrelay/policy"
)

// daneEnv is example.test with a DNSSEC-secure MX mx1.example.test at
// 127.0.0.2, served by a go-smtp server with cert; tlsa are the records
// published at _25._tcp.mx1.example.test.
func daneEnv(t *testing.T, cert tls.Certificate, tlsa ...string) (*testEnv, *testMX) {
	t.Helper()
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2")
	for _, r := range tlsa {
		v.dns.Add(t, "_25._tcp.mx1.example.test. 300 IN TLSA "+r)
	}
	v.dns.Secure("example.test", "mx1.example.test", "_25._tcp.mx1.example.test")
	mx := newMX(t, withTLS(cert))
	v.route("127.0.0.2", mx.Addr)
	return v, mx
}

// withDANE puts the real DANE source in front of next (nil: nothing else).
func (v *testEnv) withDANE(next policy.PolicySource) func(*Options) {
	return func(o *Options) {
		src, err := dane.New(dane.Options{Resolver: v.resolver()})
		if err != nil {
			v.t.Fatal(err)
		}
		o.Policy = policy.Chain(src, next)
	}
}

func (v *testEnv) results(mx string) []policy.SessionResult {
	var out []policy.SessionResult
	for _, r := range v.rec.results() {
		if r.MX == mx {
			out = append(out, r)
		}
	}
	return out
}

func TestDANEEEDeliversToTheMatchingServer(t *testing.T) {
	ca := testpki.NewCA(t) // trusted by nobody: DANE-EE needs no CA
	cert := ca.IssueWith(t, testpki.Options{SelfSigned: true}, "unrelated.name")
	v, mx := daneEnv(t, cert, testpki.TLSA(cert.Leaf, 3, 1, 1))
	st := deliver(t, v.engine(v.withDANE(nil)), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if m := mx.messages(); len(m) != 1 || !m[0].tls {
		t.Fatalf("messages %+v, want one over TLS", m)
	}
	if !slices.Equal(mx.serverName, []string{"mx1.example.test"}) {
		t.Errorf("SNI %q, want the TLSA base domain", mx.serverName)
	}
	res := v.results("mx1.example.test")
	if len(res) != 1 || res[0].Result != policy.ResultSuccess || res[0].Policy.Type != policy.TypeTLSA ||
		res[0].Policy.Strings[0] != testpki.TLSA(cert.Leaf, 3, 1, 1) {
		t.Errorf("session results %+v, want one success under the TLSA policy", res)
	}
	if !strings.Contains(v.logs.String(), "policy=dane/dane") {
		t.Errorf("log does not name the DANE policy:\n%s", v.logs)
	}
}

func TestDANETADeliversWithTheTestCA(t *testing.T) {
	ca := testpki.NewCA(t)
	cert := ca.WithChain(ca.Issue(t, "mx1.example.test"))
	v, mx := daneEnv(t, cert, testpki.TLSA(ca.Cert, 2, 0, 1))
	st := deliver(t, v.engine(v.withDANE(nil)), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if len(mx.messages()) != 1 {
		t.Fatal("not delivered")
	}
}

func TestDANEMismatchDefersWithTheReason(t *testing.T) {
	ca := testpki.NewCA(t)
	cert := ca.Issue(t, "mx1.example.test") // valid for the name, but not the key DNS names
	other := ca.Issue(t, "mx1.example.test")
	v, mx := daneEnv(t, cert, testpki.TLSA(other.Leaf, 3, 1, 1))
	st := deliver(t, v.engine(v.withDANE(nil)), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.7.5", "mx1.example.test[127.0.0.2]: TLSA records did not match the certificate (DANE)")
	if len(mx.messages()) != 0 {
		t.Fatal("delivered to a server the TLSA records do not authenticate")
	}
	res := v.results("mx1.example.test")
	if len(res) != 1 || res[0].Result != policy.ResultCertificateNotTrusted || res[0].Policy.Type != policy.TypeTLSA {
		t.Errorf("session results %+v, want certificate-not-trusted under the TLSA policy", res)
	}
}

// The check runs inside the handshake: the server sees a bad_certificate
// alert, and no SMTP command crosses the unauthenticated channel.
func TestDANEFailureEndsTheHandshakeWithAnAlert(t *testing.T) {
	ca := testpki.NewCA(t)
	cert := ca.Issue(t, "mx1.example.test")
	other := ca.Issue(t, "mx1.example.test")
	serverErr := make(chan error, 1)
	addr := rawServer(t, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		r := textproto.NewReader(bufio.NewReader(c))
		c.Write([]byte("220 mx1.example.test ESMTP\r\n"))
		r.ReadLine() // EHLO
		c.Write([]byte("250-mx1.example.test\r\n250 STARTTLS\r\n"))
		r.ReadLine() // STARTTLS
		c.Write([]byte("220 go ahead\r\n"))
		tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{cert}})
		err := tc.Handshake()
		if err == nil {
			// TLS 1.3: the client's alert arrives after the server's
			// side of the handshake; the first read sees it.
			_, err = tc.Read(make([]byte, 1))
		}
		serverErr <- err
	})
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx1.example.test. 300 IN TLSA "+testpki.TLSA(other.Leaf, 3, 1, 1))
	v.dns.Secure("example.test", "mx1.example.test", "_25._tcp.mx1.example.test")
	v.route("127.0.0.2", addr)
	st := deliver(t, v.engine(v.withDANE(nil)), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.7.5", "TLSA records did not match")
	select {
	case err := <-serverErr:
		if err == nil || !strings.Contains(err.Error(), "bad certificate") {
			t.Fatalf("server saw %v, want a bad_certificate alert", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("server never finished")
	}
}

func TestDANEHostWithoutSTARTTLSDefers(t *testing.T) {
	cert := testpki.NewCA(t).Issue(t, "mx1.example.test")
	v, mx := daneEnv(t, cert, testpki.TLSA(cert.Leaf, 3, 1, 1))
	mx.srv.TLSConfig = nil
	st := deliver(t, v.engine(v.withDANE(nil)), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.7.5", "STARTTLS not offered (DANE)")
	if len(mx.messages()) != 0 {
		t.Fatal("delivered in plaintext to a host with TLSA records")
	}
	if res := v.results("mx1.example.test"); len(res) != 1 || res[0].Result != policy.ResultSTARTTLSNotSupported {
		t.Errorf("session results %+v", res)
	}
}

// RFC 7672 §2.2: unusable records only: TLS with any certificate, and
// still never plaintext.
func TestUnusableTLSARecordsRequireTLSWithoutAuthentication(t *testing.T) {
	cert := testpki.NewCA(t).IssueWith(t, testpki.Options{SelfSigned: true, Expired: true}, "x.test")
	v, mx := daneEnv(t, cert, "1 1 1 "+strings.Repeat("ab", 32), "4 0 1 "+strings.Repeat("ab", 32))
	e := v.engine(v.withDANE(nil))
	wantStatus(t, deliver(t, e, testJob("example.test", "a@example.test"))[0], 250, "2.0.0")
	if m := mx.messages(); len(m) != 1 || !m[0].tls {
		t.Fatalf("messages %+v, want one over TLS", m)
	}
	mx.srv.TLSConfig = nil
	wantStatus(t, deliver(t, e, testJob("example.test", "a@example.test"))[0], 451, "4.7.5", "STARTTLS not offered (DANE)")
	if len(mx.messages()) != 1 {
		t.Fatal("delivered in plaintext to a host with (unusable) TLSA records")
	}
}

// RFC 7672 §2.1.2: a failed TLSA lookup makes that host unusable (never
// dialed, its reason kept); the next MX host takes the mail.
func TestTLSALookupFailureSkipsTheHostAndTriesTheNext(t *testing.T) {
	cert := testpki.NewCA(t).Issue(t, "mx.example.test")
	v, mx1 := daneEnv(t, cert, testpki.TLSA(cert.Leaf, 3, 1, 1))
	v.dns.Add(t, "example.test. 300 IN MX 20 mx2.example.test.")
	v.dns.Add(t, "mx2.example.test. 300 IN A 127.0.0.3")
	v.dns.Secure("mx2.example.test", "_25._tcp.mx2.example.test")
	mx2 := newMX(t, withTLS(cert))
	v.route("127.0.0.3", mx2.Addr)
	v.dns.SetFault("_25._tcp.mx1.example.test", dns.TypeTLSA, dnstest.FaultServfail)

	e := v.engine(v.withDANE(nil))
	wantStatus(t, deliver(t, e, testJob("example.test", "a@example.test"))[0], 250, "2.0.0")
	if mx1.sessionCount() != 0 || len(mx2.messages()) != 1 {
		t.Fatalf("mx1 sessions %d, mx2 messages %d; want mx1 never dialed", mx1.sessionCount(), len(mx2.messages()))
	}
	res := v.results("mx1.example.test")
	if len(res) != 1 || res[0].Result != policy.ResultDNSSECInvalid || res[0].Policy.Type != policy.TypeTLSA {
		t.Errorf("mx1 results %+v, want dnssec-invalid under a TLSA policy", res)
	}
	if !strings.Contains(v.logs.String(), "TLSA lookup for _25._tcp.mx1.example.test failed: SERVFAIL") {
		t.Errorf("the log does not say why mx1 was not used:\n%s", v.logs)
	}

	// Both hosts failing: deferred with every host's reason.
	v.dns.SetFault("_25._tcp.mx2.example.test", dns.TypeTLSA, dnstest.FaultServfail)
	st := deliver(t, v.engine(v.withDANE(nil)), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.7.5",
		"mx1.example.test: TLSA lookup for _25._tcp.mx1.example.test failed: SERVFAIL (DANE)",
		"mx2.example.test: TLSA lookup for _25._tcp.mx2.example.test failed: SERVFAIL (DANE)")
}

// RFC 8461 §2 and docs/DESIGN.md ("Security policy precedence"): DANE alone decides for a host
// with TLSA records, even one the MTA-STS policy would rule out.
func TestDANEWinsOverAnMTASTSPolicyThatWouldReject(t *testing.T) {
	cert := testpki.NewCA(t).IssueWith(t, testpki.Options{SelfSigned: true}, "mx1.example.test")
	v, mx := daneEnv(t, cert, testpki.TLSA(cert.Leaf, 3, 1, 1))
	sts := everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS, Skip: "not listed in the MTA-STS policy"})
	st := deliver(t, v.engine(v.withDANE(sts)), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if len(mx.messages()) != 1 {
		t.Fatal("not delivered")
	}
	// Without DANE, the same MTA-STS policy defers.
	st = deliver(t, v.engine(func(o *Options) { o.Policy = sts }), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.4.8")
}

// RFC 7672 §2.2.1: a worse MX with TLSA never goes before a better one
// without.
func TestWorseMXWithTLSADoesNotPreemptABetterOne(t *testing.T) {
	cert := testpki.NewCA(t).Issue(t, "mx.example.test")
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3",
		"_25._tcp.mx2.example.test. 300 IN TLSA "+testpki.TLSA(cert.Leaf, 3, 1, 1))
	v.dns.Secure("example.test", "mx1.example.test", "mx2.example.test", "_25._tcp.mx1.example.test", "_25._tcp.mx2.example.test")
	mx1, mx2 := newMX(t, withTLS(cert)), newMX(t, withTLS(cert))
	v.route("127.0.0.2", mx1.Addr)
	v.route("127.0.0.3", mx2.Addr)
	wantStatus(t, deliver(t, v.engine(v.withDANE(nil)), testJob("example.test", "a@example.test"))[0], 250, "2.0.0")
	if len(mx1.messages()) != 1 || mx2.sessionCount() != 0 {
		t.Fatal("the better MX without TLSA was not used first")
	}
}

// RFC 7672 §2.2.3, §8.1: TLSA at the CNAME-expanded name; SNI is that name.
func TestCNAMEToSecureZoneSendsTheExpandedNameAsSNI(t *testing.T) {
	cert := testpki.NewCA(t).Issue(t, "mx.provider.test")
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"mx1.example.test. 300 IN CNAME mx.provider.test.",
		"mx.provider.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx.provider.test. 300 IN TLSA "+testpki.TLSA(cert.Leaf, 3, 1, 1))
	v.dns.Secure("example.test", "mx1.example.test", "mx.provider.test", "_25._tcp.mx.provider.test")
	mx := newMX(t, withTLS(cert))
	v.route("127.0.0.2", mx.Addr)
	wantStatus(t, deliver(t, v.engine(v.withDANE(nil)), testJob("example.test", "a@example.test"))[0], 250, "2.0.0")
	if !slices.Equal(mx.serverName, []string{"mx.provider.test"}) {
		t.Errorf("SNI %q, want the TLSA base domain mx.provider.test", mx.serverName)
	}
}

// An insecure zone never blocks mail: a resolver that does not set AD
// leaves TLSA records unused, and opportunistic TLS delivers.
func TestResolverWithoutADMeansOpportunisticTLS(t *testing.T) {
	cert := testpki.NewCA(t).Issue(t, "mx1.example.test")
	other := testpki.NewCA(t).Issue(t, "mx1.example.test")
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"_25._tcp.mx1.example.test. 300 IN TLSA "+testpki.TLSA(other.Leaf, 3, 1, 1))
	mx := newMX(t, withTLS(cert))
	v.route("127.0.0.2", mx.Addr)
	wantStatus(t, deliver(t, v.engine(v.withDANE(nil)), testJob("example.test", "a@example.test"))[0], 250, "2.0.0")
	if len(mx.messages()) != 1 {
		t.Fatal("not delivered")
	}
	if n := v.dns.Queries("_25._tcp.mx1.example.test", dns.TypeTLSA); n != 0 {
		t.Errorf("TLSA queried %d times for an insecure host", n)
	}
}

// tls = "dane" is DANE where published, else what DNS gives; "dane-only"
// is DANE or nothing (Postfix's policy table).
func TestDANEAndDANEOnlyOverrides(t *testing.T) {
	cert := testpki.NewCA(t).Issue(t, "mx1.example.test")
	for _, tc := range []struct {
		name      string
		tlsa      []string
		override  Override
		code      int
		enhanced  string
		text      string
		wantTLS   bool
		dnsResult policy.ResultType // the session result recorded
	}{
		{"dane, no TLSA: opportunistic", nil, Override{Published: true}, 250, "2.0.0", "", true, policy.ResultSuccess},
		{"dane, TLSA: DANE", []string{testpki.TLSA(cert.Leaf, 3, 1, 1)}, Override{Published: true}, 250, "2.0.0", "", true, policy.ResultSuccess},
		{"dane, mismatching TLSA: deferred", []string{"3 1 1 " + strings.Repeat("00", 32)}, Override{Published: true}, 451, "4.7.5", "TLSA records did not match", false, policy.ResultCertificateNotTrusted},
		{"dane-only, TLSA: DANE", []string{testpki.TLSA(cert.Leaf, 3, 1, 1)}, Override{TLS: policy.SecurityDANE}, 250, "2.0.0", "", true, policy.ResultSuccess},
		{"dane-only, no TLSA: deferred", nil, Override{TLS: policy.SecurityDANE}, 451, "4.7.5", "DANE required but no usable TLSA records (TLS required by local policy)", false, policy.ResultDANERequired},
		{"dane-only, unusable TLSA: deferred", []string{"1 1 1 " + strings.Repeat("00", 32)}, Override{TLS: policy.SecurityDANE}, 451, "4.7.5", "DANE required but no usable TLSA records (DANE)", false, policy.ResultDANERequired},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, mx := daneEnv(t, cert, tc.tlsa...)
			tc.override.Domains = []string{"example.test"}
			e := v.engine(v.withDANE(nil), func(o *Options) { o.Overrides = []Override{tc.override} })
			st := deliver(t, e, testJob("example.test", "a@example.test"))
			wantStatus(t, st[0], tc.code, tc.enhanced, tc.text)
			m := mx.messages()
			if tc.code == 250 && (len(m) != 1 || m[0].tls != tc.wantTLS) {
				t.Errorf("messages %+v, want one with TLS=%t", m, tc.wantTLS)
			}
			if tc.code != 250 && len(m) != 0 {
				t.Errorf("delivered: %+v", m)
			}
			res := v.results("mx1.example.test")
			if len(res) != 1 || res[0].Result != tc.dnsResult {
				t.Errorf("session results %+v, want one %q", res, tc.dnsResult)
			}
		})
	}
}

// RFC 8689 §4.2.1: DANE authenticates a host for REQUIRETLS as PKIX does.
func TestRequireTLSAcceptsADANEAuthenticatedHost(t *testing.T) {
	cert := testpki.NewCA(t).IssueWith(t, testpki.Options{SelfSigned: true}, "not.the.mx.name")
	v, mx := daneEnv(t, cert, testpki.TLSA(cert.Leaf, 3, 1, 1))
	mx.srv.EnableREQUIRETLS = true
	st := deliver(t, v.engine(v.withDANE(nil)), requireTLSJob())
	wantStatus(t, st[0], 250, "2.0.0")
	if m := mx.messages(); len(m) != 1 || !m[0].mail.RequireTLS {
		t.Fatalf("messages %+v, want one with REQUIRETLS", m)
	}
}

func TestSessionsAreCountedByDANEOutcome(t *testing.T) {
	cert := testpki.NewCA(t).Issue(t, "mx1.example.test")
	v, _ := daneEnv(t, cert, testpki.TLSA(cert.Leaf, 3, 1, 1))
	ok := metricDANESessions.WithLabelValues("authenticated")
	bad := metricDANESessions.WithLabelValues("certificate-not-trusted")
	okBefore, badBefore := testutil.ToFloat64(ok), testutil.ToFloat64(bad)
	wantStatus(t, deliver(t, v.engine(v.withDANE(nil)), testJob("example.test", "a@example.test"))[0], 250, "2.0.0")

	v.dns.Remove("_25._tcp.mx1.example.test", dns.TypeTLSA)
	v.dns.Add(t, "_25._tcp.mx1.example.test. 300 IN TLSA 3 1 1 "+strings.Repeat("00", 32))
	wantStatus(t, deliver(t, v.engine(v.withDANE(nil)), testJob("example.test", "a@example.test"))[0], 451, "4.7.5")
	if got := testutil.ToFloat64(ok) - okBefore; got != 1 {
		t.Errorf("authenticated sessions counted %v, want 1", got)
	}
	if got := testutil.ToFloat64(bad) - badBefore; got != 1 {
		t.Errorf("certificate-not-trusted sessions counted %v, want 1", got)
	}
}

// Check keeps the chain of a host that failed DANE, so that it can hold it
// against the TLSA records and say what to fix; the same result as Deliver.
func TestCheckKeepsTheCertificatesOfAHostThatFailedDANE(t *testing.T) {
	ca := testpki.NewCA(t)
	cert := ca.Issue(t, "mx1.example.test")
	v, mx := daneEnv(t, cert, "3 1 1 "+strings.Repeat("00", 32))
	r := v.engine(v.withDANE(nil)).Check(t.Context(), "example.test", true)
	h := r.Hosts[0]
	if h.Session != nil || len(h.PeerCertificates) != 1 || !h.PeerCertificates[0].Equal(cert.Leaf) {
		t.Fatalf("host report %+v, want no session and the server's certificate", h)
	}
	if r.Outcome.Code != 451 || r.Outcome.Enhanced != "4.7.5" || !strings.Contains(r.Outcome.Text, "TLSA records did not match") {
		t.Errorf("outcome %s", r.Outcome)
	}
	if mx.sessionCount() != 1 || len(mx.messages()) != 0 {
		t.Errorf("sessions %d, messages %d", mx.sessionCount(), len(mx.messages()))
	}
}
