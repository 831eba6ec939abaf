package delivery

import (
	"context"
	"crypto/tls"
	"strings"
	"sync"
	"testing"

	"github.com/emersion/go-smtp"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/stsrelay/stsrelay/internal/testpki"
	"github.com/stsrelay/stsrelay/policy"
)

// switchPolicy is a policy source a test changes between deliveries; nil
// is opportunistic TLS for every host.
type switchPolicy struct {
	mu  sync.Mutex
	src policy.PolicySource
}

func (p *switchPolicy) set(src policy.PolicySource) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.src = src
}

func (p *switchPolicy) Requirements(ctx context.Context, domain string, mxs []policy.MX) ([]policy.Requirement, error) {
	p.mu.Lock()
	src := p.src
	p.mu.Unlock()
	if src == nil {
		src = everyMX(policy.Requirement{Security: policy.SecurityMay})
	}
	return src.Requirements(ctx, domain, mxs)
}

func maxTLS(version uint16) mxOption {
	return func(s *smtp.Server) { s.TLSConfig.MaxVersion = version }
}

var tlsVersions = []struct {
	name    string
	version uint16
}{{"TLS1.3", tls.VersionTLS13}, {"TLS1.2", tls.VersionTLS12}}

func TestSecondConnectionToAnMXResumesTheTLSSession(t *testing.T) {
	for _, tv := range tlsVersions {
		t.Run(tv.name, func(t *testing.T) {
			v := newEnv(t,
				"example.test. 300 IN MX 10 mx1.example.test.",
				"mx1.example.test. 300 IN A 127.0.0.2")
			mx := newMX(t, withTLS(v.ca.Issue(t, "mx1.example.test")), maxTLS(tv.version))
			v.route("127.0.0.2", mx.Addr)
			e := v.engine(func(o *Options) {
				o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS})
			})
			before := testutil.ToFloat64(metricTLSResumed)
			for range 2 {
				wantStatus(t, deliver(t, e, testJob("example.test", "a@example.test"))[0], 250, "2.0.0")
			}
			m := mx.messages()
			if len(m) != 2 || mx.sessionCount() != 2 {
				t.Fatalf("%d messages over %d connections, want 2 over 2", len(m), mx.sessionCount())
			}
			if m[0].resumed || !m[1].resumed || mx.tickets() != 1 {
				t.Errorf("resumed %v then %v, %d tickets accepted; want a full handshake, then a resumed one",
					m[0].resumed, m[1].resumed, mx.tickets())
			}
			if d := testutil.ToFloat64(metricTLSResumed) - before; d != 1 {
				t.Errorf("stsrelay_delivery_tls_resumed_total went up by %v, want 1", d)
			}
			if n := strings.Count(v.logs.String(), "tls_resumed=true"); n != 1 {
				t.Errorf("%d attempt lines say tls_resumed=true, want 1:\n%s", n, v.logs)
			}
			// The resumed session was checked as a new one: two MTA-STS
			// successes, not one.
			if res := v.rec.results(); len(res) != 2 || res[0].Result != "" || res[1].Result != "" {
				t.Errorf("session results %+v, want two successes", res)
			}
		})
	}
}

func TestTLSSessionCacheCanBeTurnedOff(t *testing.T) {
	v, mx := oneMX(t, withTLS(testpki.NewCA(t).Issue(t, "mx1.example.test")))
	e := v.engine(func(o *Options) { o.TLSSessionCacheSize = -1 })
	for range 2 {
		wantStatus(t, deliver(t, e, testJob("example.test", "a@example.test"))[0], 250, "2.0.0")
	}
	if m := mx.messages(); len(m) != 2 || m[1].resumed || mx.tickets() != 0 {
		t.Errorf("messages %+v, %d tickets offered; want two full handshakes", m, mx.tickets())
	}
}

// A session made under opportunistic TLS with a certificate for another
// name must not get a later message past an MTA-STS enforce policy: the
// resumed handshake runs the policy's check on the session's certificate,
// fails, and the message is deferred exactly as without resumption.
func TestResumedSessionStillFailsAnEnforcedMTASTSCheck(t *testing.T) {
	enforce := everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS})
	for _, tv := range tlsVersions {
		t.Run(tv.name, func(t *testing.T) {
			v := newEnv(t,
				"example.test. 300 IN MX 10 mx1.example.test.",
				"mx1.example.test. 300 IN A 127.0.0.2")
			mx := newMX(t, withTLS(v.ca.Issue(t, "mx9.example.test")), maxTLS(tv.version))
			v.route("127.0.0.2", mx.Addr)

			// Without resumption: the status to expect.
			fresh := deliver(t, v.engine(func(o *Options) { o.Policy = enforce }), testJob("example.test", "a@example.test"))[0]
			wantStatus(t, fresh, 451, "4.4.8", "mx1.example.test: certificate name mismatch")

			p := &switchPolicy{}
			e := v.engine(func(o *Options) { o.Policy = p })
			wantStatus(t, deliver(t, e, testJob("example.test", "a@example.test"))[0], 250, "2.0.0")
			p.set(enforce)
			unwrapped := mx.tickets()
			st := deliver(t, e, testJob("example.test", "a@example.test"))[0]
			if mx.tickets() != unwrapped+1 {
				t.Fatalf("the enforced delivery offered no session to resume (%d tickets accepted before, %d after)", unwrapped, mx.tickets())
			}
			if st.Code != fresh.Code || st.Enhanced != fresh.Enhanced || st.Text != fresh.Text {
				t.Errorf("after resumption: %s\nwithout:           %s", st, fresh)
			}
			if len(mx.messages()) != 1 {
				t.Errorf("%d messages received, want only the opportunistic one", len(mx.messages()))
			}
			res := v.rec.results()
			if last := res[len(res)-1]; last.Result != policy.ResultCertificateHostMismatch {
				t.Errorf("last session result %+v, want certificate-host-mismatch", last)
			}

			// The failed handshake dropped the session (RFC 5077 §3.2):
			// the next connection makes a full one.
			p.set(nil)
			wantStatus(t, deliver(t, e, testJob("example.test", "a@example.test"))[0], 250, "2.0.0")
			if m := mx.messages(); len(m) != 2 || m[1].resumed || mx.tickets() != unwrapped+1 {
				t.Errorf("after the failure: resumed %v, %d tickets accepted; want a full handshake", m[len(m)-1].resumed, mx.tickets())
			}
		})
	}
}

func TestResumedSessionIsCheckedAgainstTheTLSARecords(t *testing.T) {
	t.Run("match", func(t *testing.T) {
		cert := testpki.NewCA(t).IssueWith(t, testpki.Options{SelfSigned: true}, "unrelated.name")
		v, mx := daneEnv(t, cert, testpki.TLSA(cert.Leaf, 3, 1, 1))
		e := v.engine(v.withDANE(nil))
		for range 2 {
			wantStatus(t, deliver(t, e, testJob("example.test", "a@example.test"))[0], 250, "2.0.0")
		}
		if m := mx.messages(); len(m) != 2 || !m[1].resumed {
			t.Fatalf("messages %+v, want the second over a resumed session", m)
		}
		res := v.results("mx1.example.test")
		if len(res) != 2 || res[1].Result != policy.ResultSuccess || res[1].Policy.Type != policy.TypeTLSA {
			t.Errorf("session results %+v, want two DANE successes", res)
		}
	})
	t.Run("mismatch", func(t *testing.T) {
		ca := testpki.NewCA(t)
		cert := ca.Issue(t, "mx1.example.test")
		other := ca.Issue(t, "mx1.example.test")
		v, mx := daneEnv(t, cert, testpki.TLSA(other.Leaf, 3, 1, 1))
		withDANE := func() policy.PolicySource {
			var o Options
			v.withDANE(nil)(&o)
			return o.Policy
		}

		fresh := deliver(t, v.engine(v.withDANE(nil)), testJob("example.test", "a@example.test"))[0]
		wantStatus(t, fresh, 451, "4.7.5", "TLSA records did not match the certificate (DANE)")

		// A session made without DANE (the records were not there, or
		// not secure), then the TLSA records decide.
		p := &switchPolicy{}
		e := v.engine(func(o *Options) { o.Policy = p })
		wantStatus(t, deliver(t, e, testJob("example.test", "a@example.test"))[0], 250, "2.0.0")
		p.set(withDANE())
		unwrapped := mx.tickets()
		st := deliver(t, e, testJob("example.test", "a@example.test"))[0]
		if mx.tickets() != unwrapped+1 {
			t.Fatalf("the DANE delivery offered no session to resume")
		}
		if st.Code != fresh.Code || st.Enhanced != fresh.Enhanced || st.Text != fresh.Text {
			t.Errorf("after resumption: %s\nwithout:           %s", st, fresh)
		}
		if len(mx.messages()) != 1 {
			t.Errorf("%d messages received, want only the opportunistic one", len(mx.messages()))
		}
	})
}

// check shows what a new connection sees: it neither resumes the
// delivery sessions nor leaves one behind.
func TestCheckMakesFullHandshakes(t *testing.T) {
	v, mx := oneMX(t, withTLS(testpki.NewCA(t).Issue(t, "mx1.example.test")))
	e := v.engine()
	wantStatus(t, deliver(t, e, testJob("example.test", "a@example.test"))[0], 250, "2.0.0")
	for range 2 {
		if r := e.Check(t.Context(), "example.test", true); r.Outcome.Code != 250 {
			t.Fatalf("check: %s", r.Outcome)
		}
	}
	if mx.tickets() != 0 {
		t.Errorf("check resumed %d sessions, want none", mx.tickets())
	}
	// The delivery's own session is still there for the next delivery.
	wantStatus(t, deliver(t, e, testJob("example.test", "a@example.test"))[0], 250, "2.0.0")
	if m := mx.messages(); len(m) != 2 || !m[1].resumed {
		t.Errorf("the second delivery did not resume the first's session")
	}
}
