package delivery

import (
	"crypto/tls"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/stsrelay/stsrelay/internal/testpki"
	"github.com/stsrelay/stsrelay/policy"
)

// oneMX is the zone of most TLS tests: example.test, one MX at 127.0.0.2.
func oneMX(t *testing.T, opts ...mxOption) (*testEnv, *testMX) {
	t.Helper()
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2")
	mx := newMX(t, opts...)
	v.route("127.0.0.2", mx.Addr)
	return v, mx
}

func TestOpportunisticTLSAcceptsAnyCertificate(t *testing.T) {
	ca := testpki.NewCA(t) // not trusted by the engine
	v, mx := oneMX(t, withTLS(ca.IssueWith(t, testpki.Options{SelfSigned: true, Expired: true}, "wrong.test")))
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if m := mx.messages(); len(m) != 1 || !m[0].tls {
		t.Fatalf("message not received over TLS: %+v", m)
	}
	res := v.rec.results()
	if len(res) != 1 || res[0].Result != "" || res[0].MX != "mx1.example.test" || res[0].ReceivingIP != "127.0.0.2" ||
		res[0].HELO != "mx.test" || res[0].PolicyDomain != "example.test" {
		t.Errorf("session results = %+v, want one success for mx1.example.test with HELO mx.test", res)
	}
}

func TestPlaintextWhenSTARTTLSNotOfferedAtLevelMay(t *testing.T) {
	v, mx := oneMX(t)
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if m := mx.messages(); len(m) != 1 || m[0].tls {
		t.Fatalf("want one plaintext message, got %+v", m)
	}
	if res := v.rec.results(); len(res) != 1 || res[0].Result != "starttls-not-supported" {
		t.Errorf("session results = %+v, want starttls-not-supported", res)
	}
}

// brokenTLS offers STARTTLS but cannot complete a handshake we accept.
func brokenTLS(t *testing.T) mxOption {
	cert := testpki.NewCA(t).Issue(t, "mx1.example.test")
	return func(s *smtpServer) {
		s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MaxVersion: tls.VersionTLS11}
	}
}

func TestBrokenTLSHandshakeRetriesPlaintextOnceAtLevelMay(t *testing.T) {
	v, mx := oneMX(t, brokenTLS(t))
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if m := mx.messages(); len(m) != 1 || m[0].tls {
		t.Fatalf("want one plaintext message, got %+v", m)
	}
	if n := mx.sessionCount(); n != 2 {
		t.Errorf("%d sessions, want 2 (TLS attempt, then plaintext)", n)
	}
	if res := v.rec.results(); len(res) != 1 || res[0].Result != "validation-failure" ||
		!strings.Contains(res[0].Detail, "TLS handshake failed") {
		t.Errorf("session results = %+v, want one handshake failure", res)
	}
}

func TestBrokenTLSHandshakeNeverFallsBackWhenTLSRequired(t *testing.T) {
	for _, tc := range []struct {
		name     string
		req      policy.Requirement
		code     int
		enhanced string
		text     string
	}{
		{"mta-sts", policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS}, 451, "4.4.8",
			"MX hosts of 'example.test' failed MTA-STS validation: mx1.example.test: TLS handshake failed"},
		{"local encrypt", policy.Requirement{Security: policy.SecurityEncrypt, Policy: testLocal}, 451, "4.7.5",
			"mx1.example.test[127.0.0.2]: TLS handshake failed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, mx := oneMX(t, brokenTLS(t))
			st := deliver(t, v.engine(func(o *Options) { o.Policy = everyMX(tc.req) }), testJob("example.test", "a@example.test"))
			wantStatus(t, st[0], tc.code, tc.enhanced, tc.text)
			if len(mx.messages()) != 0 || mx.sessionCount() != 1 {
				t.Errorf("%d messages in %d sessions, want none in 1", len(mx.messages()), mx.sessionCount())
			}
		})
	}
}

func TestVerifyDeliversWithValidCertificate(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2")
	mx := newMX(t, withTLS(v.ca.Issue(t, "mx1.example.test")))
	v.route("127.0.0.2", mx.Addr)
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS})
	})
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if res := v.rec.results(); len(res) != 1 || res[0].Result != "" || res[0].Policy != testSTS {
		t.Errorf("session results = %+v, want one mta-sts success", res)
	}
	if sni := mx.serverName; !slices.Equal(sni, []string{"mx1.example.test"}) {
		t.Errorf("SNI = %q, want the MX host name (RFC 8461 §7.1)", sni)
	}
}

func TestEnforceDefersOnCertificateProblems(t *testing.T) {
	other := testpki.NewCA(t)
	for _, tc := range []struct {
		name       string
		cert       func(v *testEnv) tls.Certificate
		reason     string
		resultType policy.ResultType
	}{
		{"name mismatch", func(v *testEnv) tls.Certificate { return v.ca.Issue(t, "mx9.example.test") },
			"certificate name mismatch", "certificate-host-mismatch"},
		{"name only in CN", func(v *testEnv) tls.Certificate {
			return v.ca.IssueWith(t, testpki.Options{CommonName: "mx1.example.test"}, "other.example.test")
		}, "certificate name mismatch", "certificate-host-mismatch"},
		{"wildcard two labels deep", func(v *testEnv) tls.Certificate { return v.ca.Issue(t, "*.test") },
			"certificate name mismatch", "certificate-host-mismatch"},
		{"expired", func(v *testEnv) tls.Certificate {
			return v.ca.IssueWith(t, testpki.Options{Expired: true}, "mx1.example.test")
		}, "certificate expired", "certificate-expired"},
		{"untrusted CA", func(v *testEnv) tls.Certificate { return other.Issue(t, "mx1.example.test") },
			"certificate not trusted", "certificate-not-trusted"},
		{"self-signed", func(v *testEnv) tls.Certificate {
			return v.ca.IssueWith(t, testpki.Options{SelfSigned: true}, "mx1.example.test")
		}, "certificate not trusted", "certificate-not-trusted"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := newEnv(t,
				"example.test. 300 IN MX 10 mx1.example.test.",
				"mx1.example.test. 300 IN A 127.0.0.2")
			mx := newMX(t, withTLS(tc.cert(v)))
			v.route("127.0.0.2", mx.Addr)
			e := v.engine(func(o *Options) {
				o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS})
			})
			st := deliver(t, e, testJob("example.test", "a@example.test"))
			wantStatus(t, st[0], 451, "4.4.8",
				"MX hosts of 'example.test' failed MTA-STS validation: mx1.example.test: "+tc.reason)
			if len(mx.messages()) != 0 {
				t.Error("message delivered despite the failed certificate check")
			}
			if res := v.rec.results(); len(res) != 1 || res[0].Result != tc.resultType {
				t.Errorf("session results = %+v, want %s", res, tc.resultType)
			}
		})
	}
}

func TestWildcardCertificateMatchesOneLeftMostLabel(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2")
	mx := newMX(t, withTLS(v.ca.Issue(t, "*.example.test")))
	v.route("127.0.0.2", mx.Addr)
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS})
	})
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
}

func TestVerifyAcceptsAnyOfRequirementNames(t *testing.T) {
	v, mx := oneMX(t)
	mx.srv.TLSConfig = nil
	mx2 := newMX(t, withTLS(v.ca.Issue(t, "b.provider.test")))
	v.route("127.0.0.2", mx2.Addr)
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS,
			Names: []string{"mx1.example.test", "b.provider.test"}, ServerName: "b.provider.test"})
	})
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if sni := mx2.serverName; !slices.Equal(sni, []string{"b.provider.test"}) {
		t.Errorf("SNI = %q, want policy.Requirement.ServerName", sni)
	}
}

func TestEnforceDefersWhenSTARTTLSNotOffered(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	mx1 := newMX(t, withTLS(v.ca.Issue(t, "wrong.example.test")))
	mx2 := newMX(t)
	v.route("127.0.0.2", mx1.Addr)
	v.route("127.0.0.3", mx2.Addr)
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS})
	})
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.4.8",
		"MX hosts of 'example.test' failed MTA-STS validation: mx1.example.test: certificate name mismatch; mx2.example.test: STARTTLS not offered")
	if len(mx1.messages())+len(mx2.messages()) != 0 {
		t.Error("message delivered despite MTA-STS enforce")
	}
}

func TestTestingModeDeliversDespiteFailuresAndRecordsThem(t *testing.T) {
	v, mx := oneMX(t)
	mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, "wrong.example.test")}}
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS, Testing: true})
	})
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if m := mx.messages(); len(m) != 1 || !m[0].tls {
		t.Errorf("want one message over TLS, got %+v", m)
	}
	if res := v.rec.results(); len(res) != 1 || res[0].Result != "certificate-host-mismatch" {
		t.Errorf("session results = %+v, want certificate-host-mismatch", res)
	}
	if logs := v.logs.String(); !strings.Contains(logs, `tls_problem="certificate name mismatch"`) ||
		!strings.Contains(logs, "policy=mta-sts/verify/testing") {
		t.Errorf("log line does not show the tolerated failure:\n%s", logs)
	}
}

func TestTestingModeDeliversToUnlistedMXAndRecordsOneFailure(t *testing.T) {
	v, mx := oneMX(t)
	mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, "mx1.example.test")}}
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS, Testing: true,
			Skip: "not listed in the MTA-STS policy"})
	})
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if res := v.rec.results(); len(res) != 1 || res[0].Result != "validation-failure" || res[0].Detail != "not listed in the MTA-STS policy" {
		t.Errorf("session results = %+v, want exactly one validation-failure", res)
	}
}

func TestSkippedMXIsNeverDialed(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	mx1 := newMX(t, withTLS(v.ca.Issue(t, "mx1.example.test")))
	mx2 := newMX(t, withTLS(v.ca.Issue(t, "mx2.example.test")))
	v.route("127.0.0.2", mx1.Addr)
	v.route("127.0.0.3", mx2.Addr)
	skipFirst := policyFunc(func(_ ctxT, _ string, mxs []policy.MX) ([]policy.Requirement, error) {
		out := make([]policy.Requirement, len(mxs))
		for i, mx := range mxs {
			out[i] = policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS, Names: []string{mx.Name}}
			if mx.Name == "mx1.example.test" {
				out[i].Skip = "not listed in the MTA-STS policy"
			}
		}
		return out, nil
	})
	e := v.engine(func(o *Options) { o.Policy = skipFirst })
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "mx2.example.test")
	if mx1.sessionCount() != 0 {
		t.Error("a skipped MX host was dialed")
	}

	if res := v.rec.results(); len(res) != 2 || res[0].MX != "mx1.example.test" || res[0].Result != "validation-failure" ||
		res[0].Detail != "not listed in the MTA-STS policy" || res[1].Result != "" {
		t.Errorf("session results = %+v, want the skip as validation-failure, then a success", res)
	}

	mx2.srv.TLSConfig = nil
	st = deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.4.8",
		"mx1.example.test: not listed in the MTA-STS policy; mx2.example.test: STARTTLS not offered")
}

func TestPolicyErrorDefersWithItsOwnStatus(t *testing.T) {
	v, mx := oneMX(t)
	failing := policyFunc(func(_ ctxT, _ string, _ []policy.MX) ([]policy.Requirement, error) {
		return nil, &policy.Error{Code: 451, Enhanced: "4.7.5", Text: "mx1.example.test: TLSA lookup failed in a secure zone"}
	})
	st := deliver(t, v.engine(func(o *Options) { o.Policy = failing }), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.7.5", "TLSA lookup failed")
	if mx.sessionCount() != 0 {
		t.Error("dialed although the policy lookup failed")
	}
}

func TestDANERequirementWithoutAuthenticatorDefers(t *testing.T) {
	v, mx := oneMX(t, withTLS(testpki.NewCA(t).Issue(t, "mx1.example.test")))
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityDANE, Policy: testTLSA})
	})
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.7.5", "mx1.example.test: DANE required but no usable TLSA records")
	if mx.sessionCount() != 0 {
		t.Error("dialed a DANE host without a way to authenticate it")
	}
}

func TestLocalOverrides(t *testing.T) {
	for _, tc := range []struct {
		name      string
		published policy.Requirement
		override  policy.Security
		cert      bool // the MX offers STARTTLS with a wrong-name cert
		code      int
		enhanced  string
		wantTLS   bool
	}{
		{"none never starts TLS", policy.Requirement{}, policy.SecurityNone, true, 250, "2.0.0", false},
		{"none beats MTA-STS enforce", policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS}, policy.SecurityNone, true, 250, "2.0.0", false},
		{"encrypt accepts any certificate", policy.Requirement{}, policy.SecurityEncrypt, true, 250, "2.0.0", true},
		{"encrypt needs STARTTLS", policy.Requirement{}, policy.SecurityEncrypt, false, 451, "4.7.5", false},
		{"verify checks the MX name", policy.Requirement{}, policy.SecurityVerify, true, 451, "4.7.5", false},
		{"encrypt cannot weaken MTA-STS enforce", policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS}, policy.SecurityEncrypt, true, 451, "4.4.8", false},
		{"may cannot weaken MTA-STS enforce", policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS}, policy.SecurityMay, true, 451, "4.4.8", false},
		{"may beats MTA-STS testing", policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS, Testing: true}, policy.SecurityMay, true, 250, "2.0.0", true},
		{"dane-only defers until DANE lands", policy.Requirement{}, policy.SecurityDANE, true, 451, "4.7.5", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, mx := oneMX(t)
			if tc.cert {
				mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, "wrong.example.test")}}
			}
			e := v.engine(func(o *Options) {
				o.Policy = everyMX(tc.published)
				o.Overrides = []Override{{Domains: []string{"Example.Test."}, TLS: tc.override}}
			})
			st := deliver(t, e, testJob("example.test", "a@example.test"))
			wantStatus(t, st[0], tc.code, tc.enhanced)
			m := mx.messages()
			if tc.code == 250 && (len(m) != 1 || m[0].tls != tc.wantTLS) {
				t.Errorf("messages %+v, want one with TLS=%t", m, tc.wantTLS)
			}
		})
	}
}

func TestOverrideNeverDialsAnMXThatMTASTSEnforceRulesOut(t *testing.T) {
	v, mx := oneMX(t)
	mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, "mx1.example.test")}}
	for _, sec := range []policy.Security{policy.SecurityMay, policy.SecurityEncrypt, policy.SecurityVerify} {
		e := v.engine(func(o *Options) {
			o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS, Skip: "not listed in the MTA-STS policy for example.test"})
			o.Overrides = []Override{{Domains: []string{"example.test"}, TLS: sec}}
		})
		st := deliver(t, e, testJob("example.test", "a@example.test"))
		wantStatus(t, st[0], 451, "4.4.8", "not listed in the MTA-STS policy")
	}
	if n := mx.sessionCount(); n != 0 {
		t.Fatalf("an override dialed an MX that the enforce policy rules out (%d sessions)", n)
	}
}

// RFC 8461 §7.2 (and plain prudence): TLS 1.2 or newer. A server that
// speaks only TLS 1.1 fails an MTA-STS requirement.
func TestTLSOlderThan12FailsAVerifyRequirement(t *testing.T) {
	v, mx := oneMX(t)
	mx.srv.TLSConfig = &tls.Config{
		Certificates: []tls.Certificate{v.ca.Issue(t, "mx1.example.test")},
		MinVersion:   tls.VersionTLS10, // Go's server default floor is 1.2
		MaxVersion:   tls.VersionTLS11,
	}
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS, Names: []string{"mx1.example.test"}})
	})
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.4.8", "TLS handshake failed")
	if len(mx.messages()) != 0 {
		t.Fatal("delivered over TLS 1.1")
	}
}

func TestOverrideNeverWeakensDANE(t *testing.T) {
	dane := policy.Requirement{Security: policy.SecurityDANE, Policy: testTLSA}
	mx := policy.MX{Name: "mx1.example.test"}
	for _, sec := range []policy.Security{policy.SecurityMay, policy.SecurityEncrypt, policy.SecurityVerify, policy.SecurityDANE} {
		if got := (override{sec: sec, id: testLocal}.apply(dane, mx)); got.Source() != policy.TypeTLSA {
			t.Errorf("override %s replaced a DANE requirement: %+v", sec, got)
		}
	}
	if got := (override{sec: policy.SecurityNone, id: testLocal}.apply(dane, mx)); got.Security != policy.SecurityNone || got.Source() != policy.TypeLocal {
		t.Errorf("an explicit none must win: %+v", got)
	}
}

func TestOutcomesAreCountedByPolicy(t *testing.T) {
	v, mx := oneMX(t)
	mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, "mx1.example.test")}}
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS, Names: []string{"mx1.example.test"}})
	})
	counter := metricRecipients.WithLabelValues("delivered", "mta-sts/verify")
	before := testutil.ToFloat64(counter)
	st := deliver(t, e, testJob("example.test", "a@example.test", "b@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if got := testutil.ToFloat64(counter) - before; got != 2 {
		t.Fatalf("delivered recipients under mta-sts/verify counted %v, want 2", got)
	}
}

func TestActiveConnectionsAreCountedPerDomain(t *testing.T) {
	v, _ := oneMX(t)
	e := v.engine(func(o *Options) { o.IdleTimeout = time.Minute })
	wantStatus(t, deliver(t, e, testJob("example.test", "a@example.test"))[0], 250, "2.0.0")
	// The connection waits in the idle cache for the next message.
	if got := testutil.ToFloat64(metricDomainConns.WithLabelValues("example.test")); got != 1 {
		t.Fatalf("example.test connections = %v, want 1 while the connection is cached", got)
	}
	e.Close()
	if n := testutil.CollectAndCount(metricDomainConns); n != 0 {
		t.Fatalf("%d domain series left after every connection closed, want none", n)
	}
}
