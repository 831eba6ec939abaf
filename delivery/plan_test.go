package delivery

import (
	"crypto/tls"
	"fmt"
	"testing"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/internal/testpki"
	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
)

// What Check says a message would get is what a delivery attempt gets,
// for every kind of route and requirement: both run the same plan and the
// same connection code.
func TestCheckOutcomeEqualsDeliveryOutcome(t *testing.T) {
	for _, tc := range []struct {
		name     string
		setup    func(t *testing.T, v *testEnv, mx *testMX)
		opts     func(*Options)
		code     int
		enhanced string
	}{
		{name: "opportunistic, no STARTTLS", code: 250, enhanced: "2.0.0"},
		{name: "MTA-STS enforce, valid certificate",
			setup: func(t *testing.T, v *testEnv, mx *testMX) {
				mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, "mx1.example.test")}}
			},
			opts: func(o *Options) {
				o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS, Names: []string{"mx1.example.test"}})
			},
			code: 250, enhanced: "2.0.0"},
		{name: "MTA-STS enforce, wrong-name certificate",
			setup: func(t *testing.T, v *testEnv, mx *testMX) {
				mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, "other.test")}}
			},
			opts: func(o *Options) {
				o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS, Names: []string{"mx1.example.test"}})
			},
			code: 451, enhanced: "4.4.8"},
		{name: "MTA-STS enforce, MX not listed",
			opts: func(o *Options) {
				o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS, Skip: "not listed in the MTA-STS policy"})
			},
			code: 451, enhanced: "4.4.8"},
		{name: "local none over MTA-STS enforce",
			setup: func(t *testing.T, v *testEnv, mx *testMX) {
				mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, "other.test")}}
			},
			opts: func(o *Options) {
				o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS})
				o.Overrides = []Override{{Domains: []string{"example.test"}, TLS: policy.SecurityNone}}
			},
			code: 250, enhanced: "2.0.0"},
		{name: "local dane-only without TLSA",
			setup: func(t *testing.T, v *testEnv, mx *testMX) {
				mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, "mx1.example.test")}}
			},
			opts: func(o *Options) {
				o.Overrides = []Override{{Domains: []string{"example.test"}, TLS: policy.SecurityDANE}}
			},
			code: 451, enhanced: "4.7.5"},
		{name: "local verify, untrusted certificate",
			setup: func(t *testing.T, v *testEnv, mx *testMX) {
				mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{testpki.NewCA(t).Issue(t, "mx1.example.test")}}
			},
			opts: func(o *Options) {
				o.Overrides = []Override{{Domains: []string{"example.test"}, TLS: policy.SecurityVerify}}
			},
			code: 451, enhanced: "4.7.5"},
		{name: "MX refuses connections",
			setup: func(t *testing.T, v *testEnv, mx *testMX) { v.route("127.0.0.2", "127.0.0.1:1") },
			code:  451, enhanced: "4.4.1"},
		{name: "null MX",
			setup: func(t *testing.T, v *testEnv, mx *testMX) {
				v.dns.Remove("example.test.", dns.TypeMX)
				v.dns.Add(t, "example.test. 300 IN MX 0 .")
			},
			code: 550, enhanced: "5.1.10"},
		{name: "MX lookup SERVFAIL",
			setup: func(t *testing.T, v *testEnv, mx *testMX) {
				v.dns.SetFault("example.test.", dns.TypeMX, dnstest.FaultServfail)
			},
			code: 451, enhanced: "4.4.3"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, mx := oneMX(t)
			if tc.setup != nil {
				tc.setup(t, v, mx)
			}
			mods := []func(*Options){}
			if tc.opts != nil {
				mods = append(mods, tc.opts)
			}
			r := v.engine(mods...).Check(t.Context(), "example.test", true)
			st := deliver(t, v.engine(mods...), testJob("example.test", "a@example.test"))[0]
			if r.Outcome.Code != st.Code || r.Outcome.Enhanced != st.Enhanced {
				t.Fatalf("check says %q, delivery got %q", r.Outcome, st)
			}
			if st.Code != tc.code || st.Enhanced != tc.enhanced {
				t.Errorf("delivery got %q, want %d %s", st, tc.code, tc.enhanced)
			}
			if !st.Delivered() && r.Outcome.Text != st.Text {
				t.Errorf("check's reason %q differs from delivery's %q", r.Outcome.Text, st.Text)
			}
			if n := len(mx.messages()); st.Delivered() && n != 1 {
				t.Errorf("the sink got %d messages, want the delivered one only (check sends none)", n)
			}
		})
	}
}

func TestCheckShowsTheImplicitMX(t *testing.T) {
	v := newEnv(t, "example.test. 300 IN A 127.0.0.2")
	mx := newMX(t)
	v.route("127.0.0.2", mx.Addr)
	r := v.engine().Check(t.Context(), "example.test", false)
	if !r.Implicit || len(r.Hosts) != 1 || r.Hosts[0].MX.Name != "example.test" || r.Outcome.Code != 0 {
		t.Fatalf("report = %+v, want the domain itself as implicit MX, not yet probed", r)
	}
	if mx.sessionCount() != 0 {
		t.Error("a check without connect dialed the MX")
	}
}

func TestCheckDescribesTheSession(t *testing.T) {
	v, mx := oneMX(t)
	mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, "mx1.example.test")}}
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS, Names: []string{"mx1.example.test"}})
	})
	r := e.Check(t.Context(), "example.test", true)
	h := r.Hosts[0]
	if h.Session == nil || h.Session.TLS == nil || h.Session.Protection != "verified TLS, MTA-STS enforce" ||
		h.Session.Certificate().DNSNames[0] != "mx1.example.test" || h.Session.Greeting != "mx.test" {
		t.Fatalf("host report = %+v, session %+v", h, h.Session)
	}
	if want := (queue.Status{Code: 250, Enhanced: "2.0.0",
		Text: "would deliver to mx1.example.test[127.0.0.2] (verified TLS, MTA-STS enforce)"}); r.Outcome != want {
		t.Errorf("outcome %q, want %q", r.Outcome, want)
	}
	if res := v.rec.results(); len(res) != 1 || res[0].Result != policy.ResultSuccess {
		t.Errorf("session results = %+v; the probe's TLS session is recorded like any other", res)
	}
}

// Check dials every address of every host, but its outcome counts the
// connections as a delivery attempt does (at most
// MaxConnectionsPerAttempt, one kept for each later host): a working
// address that delivery would not reach is not where check says the mail
// goes.
func TestCheckCountsConnectionsAsDeliveryDoes(t *testing.T) {
	for _, tc := range []struct {
		name    string
		records func() []string
		working string // the one address that answers
		// verdicts of the host with the working address, and its reach
		verdict string
		reach   int
	}{
		{name: "a working address behind the ones delivery dials",
			records: func() []string {
				// mx1: nine addresses refused, then the working one; mx2
				// refused. Delivery gives mx1 nine, keeping one for mx2.
				r := []string{"example.test. 300 IN MX 10 mx1.example.test.", "example.test. 300 IN MX 20 mx2.example.test.",
					"mx2.example.test. 300 IN A 127.0.0.3"}
				for i := range MaxConnectionsPerAttempt {
					r = append(r, fmt.Sprintf("mx1.example.test. 300 IN A 127.0.1.%d", i+1))
				}
				return r
			},
			working: "127.0.1.10", verdict: "mx1.example.test", reach: MaxConnectionsPerAttempt - 1},
		{name: "a working host that delivery would not try",
			records: func() []string {
				var r []string
				for i := range MaxConnectionsPerAttempt + 1 {
					r = append(r,
						fmt.Sprintf("example.test. 300 IN MX %d mx%02d.example.test.", 10*(i+1), i+1),
						fmt.Sprintf("mx%02d.example.test. 300 IN A 127.0.1.%d", i+1, i+1))
				}
				return r
			},
			working: "127.0.1.11", verdict: "mx11.example.test", reach: 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := newEnv(t, tc.records()...)
			mx := newMX(t)
			v.route(tc.working, mx.Addr)
			r := v.engine().Check(t.Context(), "example.test", true)
			st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))[0]
			wantStatus(t, st, 451, "4.4.1")
			if r.Outcome != st || r.Via != "" {
				t.Fatalf("check says %q (via %q), delivery got %q", r.Outcome, r.Via, st)
			}
			var host *HostReport
			for i := range r.Hosts {
				if r.Hosts[i].MX.Name == tc.verdict {
					host = &r.Hosts[i]
				}
			}
			if host == nil || host.Session == nil || host.Session.Addr.String() != tc.working {
				t.Fatalf("check did not show the session at %s: %+v", tc.working, host)
			}
			if host.Reach != tc.reach || host.Reached() {
				t.Errorf("%s: reach %d, reached %v; want %d, not reached", tc.verdict, host.Reach, host.Reached(), tc.reach)
			}
		})
	}
}
