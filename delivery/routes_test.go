package delivery

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/resolve"
	"github.com/stsrelay/stsrelay/sts"
)

// The upstream account of the tests; neither may ever show outside the
// AUTH exchange.
const (
	testUser = "acct-7731"
	testPass = "pw-Zq8!hunter2"
)

func creds() *Credentials { return &Credentials{Username: testUser, Password: testPass} }

func withRoutes(routes ...Route) func(*Options) {
	return func(o *Options) {
		for i := range routes {
			if routes[i].Name == "" {
				routes[i].Name = fmt.Sprintf("delivery.route[%d]", i)
			}
		}
		o.Routes = routes
	}
}

// noSecrets fails the test when the credentials appear in s.
func noSecrets(t *testing.T, where, s string) {
	t.Helper()
	if strings.Contains(s, testPass) || strings.Contains(s, testUser) {
		t.Errorf("credentials in %s: %s", where, s)
	}
}

func TestRouteLogsInToSmartHostAfterVerifiedSTARTTLS(t *testing.T) {
	for _, mech := range []string{sasl.Plain, sasl.Login} {
		t.Run(mech, func(t *testing.T) {
			v := newEnv(t, "smtp.provider.test. 300 IN A 127.0.0.1")
			up := newUpstream(t, nil, upSTARTTLS(v.ca.Issue(t, "smtp.provider.test")), upAuth(testUser, testPass))
			up.mechs = []string{mech}
			nexthop := "smtp.provider.test:" + strconv.Itoa(up.Port)
			e := v.engine(withRoutes(Route{Domains: []string{"*"}, Nexthop: nexthop, Auth: creds()}))

			// gmail.test exists nowhere in DNS: the route never asks.
			st := deliver(t, e, testJob("gmail.test", "a@gmail.test"))
			wantStatus(t, st[0], 250, "2.0.0", "smtp.provider.test[127.0.0.1]:"+strconv.Itoa(up.Port))
			if a := up.authAttempts(); !slices.Equal(a, []string{testUser + ":" + testPass + ":true"}) {
				t.Errorf("AUTH attempts %q, want one over TLS", a)
			}
			if m := up.messages(); len(m) != 1 || !m[0].tls || m[0].rcpts[0] != "a@gmail.test" {
				t.Errorf("upstream got %+v", m)
			}
			logs := v.logs.String()
			for _, want := range []string{"route=delivery.route[0]", "nexthop=" + nexthop, "policy=local/verify"} {
				if !strings.Contains(logs, want) {
					t.Errorf("log lacks %q:\n%s", want, logs)
				}
			}
			noSecrets(t, "logs", logs)
		})
	}
}

func TestRouteWithImplicitTLS(t *testing.T) {
	v := newEnv(t, "smtp.provider.test. 300 IN A 127.0.0.1")
	cert := v.ca.Issue(t, "smtp.provider.test")
	up := newUpstream(t, &cert, upAuth(testUser, testPass))
	e := v.engine(withRoutes(Route{Domains: []string{"*"}, Nexthop: "[smtp.provider.test]:" + strconv.Itoa(up.Port),
		ImplicitTLS: true, Auth: creds()}))
	st := deliver(t, e, testJob("example.org", "a@example.org"))
	wantStatus(t, st[0], 250, "2.0.0")
	if a := up.authAttempts(); len(a) != 1 || !strings.HasSuffix(a[0], ":true") {
		t.Errorf("AUTH attempts %q, want one over TLS", a)
	}
	if m := up.messages(); len(m) != 1 || !m[0].tls {
		t.Errorf("upstream got %+v", m)
	}
}

func TestImplicitTLSWithWrongCertificateSendsNoPassword(t *testing.T) {
	v := newEnv(t, "smtp.provider.test. 300 IN A 127.0.0.1")
	cert := v.ca.Issue(t, "other.provider.test")
	up := newUpstream(t, &cert, upAuth(testUser, testPass))
	e := v.engine(withRoutes(Route{Domains: []string{"*"}, Nexthop: "[smtp.provider.test]:" + strconv.Itoa(up.Port),
		ImplicitTLS: true, Auth: creds()}))
	st := deliver(t, e, testJob("example.org", "a@example.org"))
	wantStatus(t, st[0], 451, "4.7.5", "certificate name mismatch (TLS required by local policy)")
	if a := up.authAttempts(); len(a) != 0 {
		t.Errorf("AUTH attempts %q over an unverified connection", a)
	}
}

// "TLS-Required: No" (RFC 8689 §5) waives the smart host's published
// MTA-STS for the message, not the route's own verify, which guards its
// password: an upstream with a certificate for another name gets no
// AUTH, whether the message waives published policies or not.
func TestTLSRequiredNoKeepsTheRoutesVerifyForItsPassword(t *testing.T) {
	for _, good := range []bool{false, true} {
		t.Run(fmt.Sprintf("certificate valid %v", good), func(t *testing.T) {
			v := newEnv(t, "smtp.provider.test. 300 IN A 127.0.0.1")
			name := "attacker.test"
			if good {
				name = "smtp.provider.test"
			}
			up := newUpstream(t, nil, upSTARTTLS(v.ca.Issue(t, name)), upAuth(testUser, testPass))
			e := v.engine(withRoutes(Route{Domains: []string{"*"}, Nexthop: "smtp.provider.test:" + strconv.Itoa(up.Port), Auth: creds()}),
				func(o *Options) {
					o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS, Names: []string{"smtp.provider.test"}})
				})
			plain := deliver(t, e, testJob("example.org", "a@example.org"))[0]
			job := testJob("example.org", "b@example.org")
			job.Envelope.NoTLSPolicy = true
			waived := deliver(t, e, job)[0]
			if good {
				wantStatus(t, plain, 250, "2.0.0")
				wantStatus(t, waived, 250, "2.0.0")
				return
			}
			wantStatus(t, plain, 451, "4.4.8", "certificate name mismatch")
			wantStatus(t, waived, 451, "4.7.5", "certificate name mismatch (TLS required by local policy)")
			if a := up.authAttempts(); len(a) != 0 {
				t.Errorf("AUTH attempts %q over a connection whose certificate names %s", a, name)
			}
		})
	}
}

func TestUpstreamWithoutAUTHGetsNoPassword(t *testing.T) {
	v := newEnv(t, "smtp.provider.test. 300 IN A 127.0.0.1")
	up := newUpstream(t, nil, upSTARTTLS(v.ca.Issue(t, "smtp.provider.test")))
	e := v.engine(withRoutes(Route{Domains: []string{"*"}, Nexthop: "[smtp.provider.test]:" + strconv.Itoa(up.Port), Auth: creds()}))
	st := deliver(t, e, testJob("example.org", "a@example.org"))
	wantStatus(t, st[0], 451, "4.7.0", "AUTH not offered; credentials of delivery.route[0] not sent")
	if len(up.messages()) != 0 {
		t.Error("message sent without logging in")
	}
}

func TestUpstreamWithoutSTARTTLSGetsNoPassword(t *testing.T) {
	for _, tc := range []struct {
		level, enhanced, text string
	}{
		// Credentials mean verify unless the route says otherwise.
		{"", "4.7.5", "STARTTLS not offered (TLS required by local policy)"},
		// Even at "may", a password never goes in the clear.
		{"may", "4.7.10", "no TLS (STARTTLS not offered or failed); credentials of delivery.route[0] not sent"},
	} {
		t.Run("tls="+tc.level, func(t *testing.T) {
			v := newEnv(t)
			up := newUpstream(t, nil, upAuth(testUser, testPass)) // offers AUTH in plaintext
			e := v.engine(withRoutes(Route{Domains: []string{"*"}, Nexthop: up.nexthop(), TLS: tc.level, Auth: creds()}))
			st := deliver(t, e, testJob("example.org", "a@example.org"))
			wantStatus(t, st[0], 451, tc.enhanced, tc.text)
			if a := up.authAttempts(); len(a) != 0 {
				t.Errorf("AUTH sent in plaintext: %q", a)
			}
		})
	}
}

func TestRefusedPasswordDefersOnceWithTheUpstreamsWords(t *testing.T) {
	// Two hosts of one smart host: a refused password is not tried again
	// on the second, which would only risk locking the account.
	v := newEnv(t,
		"provider.test. 300 IN MX 10 a.provider.test.",
		"provider.test. 300 IN MX 20 b.provider.test.",
		"a.provider.test. 300 IN A 127.0.0.1",
		"b.provider.test. 300 IN A 127.0.0.1")
	up := newUpstream(t, nil, upSTARTTLS(v.ca.Issue(t, "a.provider.test", "b.provider.test")), upAuth(testUser, testPass))
	// An upstream that echoes what it got must not leak it through us.
	up.authErr = &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8},
		Message: "Authentication credentials invalid for " + testUser + "/" + testPass}
	e := v.engine(withRoutes(Route{Domains: []string{"*"}, Nexthop: "provider.test:" + strconv.Itoa(up.Port), Auth: creds()}))
	st := deliver(t, e, testJob("example.org", "a@example.org"))
	wantStatus(t, st[0], 451, "4.7.8", ".provider.test[127.0.0.1]:", "535 5.7.8 Authentication credentials invalid", "delivery.route[0]")
	if st[0].Permanent() {
		t.Error("a wrong password bounced the recipient")
	}
	if n := len(up.authAttempts()); n != 1 {
		t.Errorf("%d AUTH attempts, want 1", n)
	}
	noSecrets(t, "status (what queue, logs and DSNs show)", st[0].String())
	noSecrets(t, "logs", v.logs.String())
}

// stsHost serves an MTA-STS policy for domain over HTTPS on loopback and
// returns a Manager that fetches it: the smart host's own policy.
func stsHost(t *testing.T, v *testEnv, domain, body string) *sts.Manager {
	t.Helper()
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/.well-known/mta-sts.txt" {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, body)
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, "mta-sts."+domain)}}
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.StartTLS()
	t.Cleanup(srv.Close)
	v.dns.Add(t, "_mta-sts."+domain+". 300 IN TXT \"v=STSv1; id=1\"")
	v.dns.Add(t, "mta-sts."+domain+". 300 IN A 127.0.0.9")
	m, err := sts.New(sts.Options{
		Resolver: v.resolver(),
		RootCAs:  v.ca.Pool,
		Recorder: v.rec,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if addr != "127.0.0.9:443" {
				return nil, fmt.Errorf("policy fetch to %s", addr)
			}
			var d net.Dialer
			return d.DialContext(ctx, network, srv.Listener.Addr().String())
		},
		Logger: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func TestSmartHostsOwnMTASTSPolicyApplies(t *testing.T) {
	for _, tc := range []struct {
		name, mx string
		auth     bool
		code     int
		enhanced string
	}{
		{"listed", "smtp.provider.test", false, 250, "2.0.0"},
		{"not listed", "other.provider.test", false, 451, "4.4.8"},
		// A route's verify never weakens the host's enforce policy.
		{"not listed, with credentials", "other.provider.test", true, 451, "4.4.8"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := newEnv(t, "smtp.provider.test. 300 IN A 127.0.0.1")
			up := newUpstream(t, nil, upSTARTTLS(v.ca.Issue(t, "smtp.provider.test")), upAuth(testUser, testPass))
			m := stsHost(t, v, "smtp.provider.test", "version: STSv1\nmode: enforce\nmx: "+tc.mx+"\nmax_age: 86400\n")
			r := Route{Domains: []string{"*"}, Nexthop: "smtp.provider.test:" + strconv.Itoa(up.Port)}
			if tc.auth {
				r.Auth = creds()
			} else {
				up.mechs = nil
			}
			e := v.engine(withRoutes(r), func(o *Options) { o.Policy = m })
			// The recipient domain publishes nothing; the smart host's
			// policy decides (RFC 8461 §3.4).
			st := deliver(t, e, testJob("example.org", "a@example.org"))
			wantStatus(t, st[0], tc.code, tc.enhanced)
			if tc.code == 250 && !strings.Contains(v.logs.String(), "policy=mta-sts/verify") {
				t.Errorf("MTA-STS did not decide:\n%s", v.logs.String())
			}
			if tc.code != 250 && len(up.messages()) != 0 {
				t.Error("mail went to a host outside the smart host's policy")
			}
			res := v.rec.results()
			if len(res) == 0 || res[0].PolicyDomain != "smtp.provider.test" || res[0].Policy == nil {
				t.Errorf("TLS results %+v, want them for the smart host's policy domain", res)
			}
		})
	}
}

// sink is a plaintext upstream that takes anything, for routing tests.
func sink(t *testing.T) *upstream { return newUpstream(t, nil) }

func TestRoutesMatchExactSubdomainAndStar(t *testing.T) {
	v := newEnv(t) // no DNS records at all
	star, sub, exact := sink(t), sink(t), sink(t)
	e := v.engine(withRoutes(
		Route{Domains: []string{"*"}, Nexthop: star.nexthop()},
		Route{Domains: []string{".example.test"}, Nexthop: sub.nexthop()},
		Route{Domains: []string{"example.test"}, Nexthop: exact.nexthop()},
	))
	for _, tc := range []struct {
		domain string
		want   *upstream
	}{{"other.test", star}, {"deep.sub.example.test", sub}, {"example.test", exact}} {
		before := len(tc.want.messages())
		st := deliver(t, e, testJob(tc.domain, "a@"+tc.domain))
		wantStatus(t, st[0], 250, "2.0.0", "[127.0.0.1]:"+strconv.Itoa(tc.want.Port))
		if len(tc.want.messages()) != before+1 {
			t.Errorf("%s went elsewhere", tc.domain)
		}
	}
}

// Two tenants' routes to one smart host: the one with limits of its own
// keeps them, whatever the other route, without limits, sends meanwhile.
// Before, both shared one key, and each delivery of the unshaped route
// replaced the other's limits and threw away its rate limiter.
func TestRoutesToOneNexthopKeepTheirOwnLimits(t *testing.T) {
	v := newEnv(t)
	up := sink(t)
	e := v.engine(withRoutes(
		Route{Domains: []string{"*"}, Senders: []string{"@a.test"}, Nexthop: up.nexthop(), Shaping: Shaping{Rate: rate.Every(time.Hour)}},
		Route{Domains: []string{"*"}, Nexthop: up.nexthop()},
	))
	from := func(sender string) *queue.Job {
		job := testJob("example.org", "x@example.org")
		job.Envelope.From = sender
		return job
	}
	if st := deliver(t, e, from("app@a.test")); !st[0].Delivered() {
		t.Fatal(st[0])
	}
	if st := deliver(t, e, from("app@b.test")); !st[0].Delivered() {
		t.Fatal(st[0])
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	st := e.Deliver(ctx, from("app@a.test"))
	wantStatus(t, st[0], 451, "4.4.2", "waiting for the destination's rate limit")
}

func TestSenderDependentRoutes(t *testing.T) {
	v := newEnv(t)
	tenant, boss, rest := sink(t), sink(t), sink(t)
	e := v.engine(withRoutes(
		Route{Domains: []string{"*"}, Senders: []string{"@tenant1.test"}, Nexthop: tenant.nexthop()},
		Route{Domains: []string{"*"}, Senders: []string{"boss@tenant1.test"}, Nexthop: boss.nexthop()},
		Route{Domains: []string{"*"}, Nexthop: rest.nexthop()},
	))
	for _, tc := range []struct {
		from string
		want *upstream
	}{{"app@tenant1.test", tenant}, {"Boss@Tenant1.test", boss}, {"x@other.test", rest}, {"", rest}} {
		job := testJob("example.org", "a@example.org")
		job.Envelope.From = tc.from
		before := len(tc.want.messages())
		st := deliver(t, e, job)
		wantStatus(t, st[0], 250, "2.0.0", "[127.0.0.1]:"+strconv.Itoa(tc.want.Port))
		if len(tc.want.messages()) != before+1 {
			t.Errorf("mail from %q went elsewhere", tc.from)
		}
	}
}

// A Postfix relayhost's local senders (root@host.internal) get their
// bounces back through a route, instead of waiting on a domain that has
// no MX.
func TestBounceFollowsRouteBackToPostfix(t *testing.T) {
	v := newEnv(t)
	postfix := sink(t)
	e := v.engine(withRoutes(Route{Domains: []string{"host.internal"}, Nexthop: postfix.nexthop()}))
	dsn := testJob("host.internal", "root@host.internal")
	dsn.Envelope.From = "" // RFC 5321 §4.5.5: a DSN's null sender
	st := deliver(t, e, dsn)
	wantStatus(t, st[0], 250, "2.0.0")
	if m := postfix.messages(); len(m) != 1 || m[0].from != "" {
		t.Errorf("Postfix got %+v", m)
	}
}

func TestBracketedAddressNexthopNeedsNoDNS(t *testing.T) {
	v := newEnv(t)
	up := sink(t)
	e := v.engine(withRoutes(Route{Domains: []string{"*"}, Nexthop: up.nexthop()}), func(o *Options) {
		// A resolver with no server behind it: every lookup fails.
		r, err := resolve.New(resolve.Config{Servers: []string{v.closed}, Timeout: 200 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		o.Resolver = r
		o.Policy = policyFunc(func(_ context.Context, domain string, _ []policy.MX) ([]policy.Requirement, error) {
			t.Errorf("policy asked about %s for an address nexthop", domain)
			return nil, nil
		})
	})
	st := deliver(t, e, testJob("example.org", "a@example.org"))
	wantStatus(t, st[0], 250, "2.0.0", "[127.0.0.1]:"+strconv.Itoa(up.Port))
}

func TestRouteToMissingHostDefersInsteadOfBouncing(t *testing.T) {
	v := newEnv(t)
	e := v.engine(withRoutes(Route{Domains: []string{"*"}, Nexthop: "missing.provider.test:587"}))
	st := deliver(t, e, testJob("example.org", "a@example.org"))
	wantStatus(t, st[0], 451, "4.4.4", "(nexthop missing.provider.test:587 of delivery.route[0])")
}

func TestPolicySourceGetsPolicyDomainAndPortOfRoute(t *testing.T) {
	v := newEnv(t, "smtp.provider.test. 300 IN A 127.0.0.1")
	up := newUpstream(t, nil, upSTARTTLS(v.ca.Issue(t, "smtp.provider.test")))
	var mu sync.Mutex
	var asked []string
	e := v.engine(withRoutes(Route{Domains: []string{"*"}, Nexthop: "[smtp.provider.test]:" + strconv.Itoa(up.Port)}), func(o *Options) {
		o.Policy = policyFunc(func(_ context.Context, domain string, mxs []policy.MX) ([]policy.Requirement, error) {
			mu.Lock()
			defer mu.Unlock()
			for _, mx := range mxs {
				// What DANE needs: _port._tcp.host for a non-MX destination.
				asked = append(asked, fmt.Sprintf("%s %s %d %t", domain, mx.Name, mx.Port, mx.MXSecure))
			}
			return make([]policy.Requirement, len(mxs)), nil
		})
	})
	deliver(t, e, testJob("example.org", "a@example.org"))
	want := fmt.Sprintf("smtp.provider.test smtp.provider.test %d true", up.Port)
	if !slices.Equal(asked, []string{want}) {
		t.Errorf("policy asked %q, want %q", asked, want)
	}
}

func TestSetRoutesSwitchesTheNextDelivery(t *testing.T) {
	v := newEnv(t)
	a, b := sink(t), sink(t)
	e := v.engine(withRoutes(Route{Name: "r", Domains: []string{"*"}, Nexthop: a.nexthop()}))
	deliver(t, e, testJob("example.org", "a@example.org"))
	if err := e.SetRoutes(nil, []Route{{Name: "r", Domains: []string{"*"}, Nexthop: b.nexthop()}}, nil); err != nil {
		t.Fatal(err)
	}
	deliver(t, e, testJob("example.org", "a@example.org"))
	if len(a.messages()) != 1 || len(b.messages()) != 1 {
		t.Errorf("a got %d, b %d; want one each", len(a.messages()), len(b.messages()))
	}
	if err := e.SetRoutes(nil, []Route{{Name: "bad", Domains: []string{"*"}, Nexthop: "[x"}}, nil); err == nil {
		t.Error("a bad table was accepted")
	}
	deliver(t, e, testJob("example.org", "a@example.org"))
	if len(b.messages()) != 2 {
		t.Error("a rejected table replaced the good one")
	}
}

func TestCheckShowsRouteNexthopAndPolicyDomainButNoCredentials(t *testing.T) {
	v := newEnv(t, "smtp.provider.test. 300 IN A 127.0.0.1")
	up := newUpstream(t, nil, upSTARTTLS(v.ca.Issue(t, "smtp.provider.test")), upAuth(testUser, testPass))
	nexthop := "smtp.provider.test:" + strconv.Itoa(up.Port)
	e := v.engine(withRoutes(
		Route{Domains: []string{"*"}, Senders: []string{"@tenant1.test"}, Nexthop: nexthop, Auth: creds()},
		Route{Domains: []string{"internal.test"}, Nexthop: "[192.0.2.25]:2525", TLS: "none"},
	))
	ctx := t.Context()
	r := e.CheckFrom(ctx, "example.org", "app@tenant1.test", true)
	if nh := r.NextHop; nh.Route != "delivery.route[0]" || nh.String() != nexthop || nh.PolicyDomain != "smtp.provider.test" ||
		!nh.HasAuth() || nh.TLSLevel() != "verify" {
		t.Errorf("next hop %+v (%s)", nh, nh)
	}
	if r.Outcome.Code != 250 {
		t.Errorf("check outcome %v", r.Outcome)
	}
	noSecrets(t, "check report", fmt.Sprintf("%+v %v %#v", r, r.NextHop, r.NextHop))

	r = e.Check(ctx, "internal.test", false)
	if nh := r.NextHop; nh.Route != "delivery.route[1]" || nh.String() != "[192.0.2.25]:2525" || nh.PolicyDomain != "" || nh.TLSLevel() != "none" {
		t.Errorf("next hop %+v", nh)
	}
	// Without a sender, the sender-dependent route does not apply.
	if r := e.Check(ctx, "example.org", false); r.NextHop.Route != "" || r.NextHop.PolicyDomain != "example.org" {
		t.Errorf("next hop %+v, want the domain's own MX", r.NextHop)
	}
}

func TestMetricsNeverNameCredentials(t *testing.T) {
	v := newEnv(t, "smtp.provider.test. 300 IN A 127.0.0.1")
	up := newUpstream(t, nil, upSTARTTLS(v.ca.Issue(t, "smtp.provider.test")), upAuth(testUser, testPass))
	up.hold()
	e := v.engine(withRoutes(Route{Domains: []string{"*"}, Nexthop: "[smtp.provider.test]:" + strconv.Itoa(up.Port), Auth: creds()}))
	done := make(chan []queue.Status)
	go func() { done <- deliver(t, e, testJob("example.org", "a@example.org")) }()
	waitFor(t, "the session", func() bool { open, _, _, _ := up.stats(); return open == 1 })
	// While the connection is open, its gauge series exists.
	mfs, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, mf := range mfs {
		fmt.Fprintln(&b, mf.String())
	}
	up.release()
	<-done
	if !strings.Contains(b.String(), "[smtp.provider.test]:"+strconv.Itoa(up.Port)) {
		t.Errorf("no connection gauge for the nexthop in:\n%s", b.String())
	}
	noSecrets(t, "metrics", b.String())
}

// A connection logged in as one account never carries mail that a route
// sends with another, even to the same nexthop.
func TestIdleConnectionsAreNotSharedBetweenAccounts(t *testing.T) {
	v := newEnv(t, "smtp.provider.test. 300 IN A 127.0.0.1")
	up := newUpstream(t, nil, upSTARTTLS(v.ca.Issue(t, "smtp.provider.test")), upAuth("tenant1", "pw1"), upAuth("tenant2", "pw2"))
	nexthop := "[smtp.provider.test]:" + strconv.Itoa(up.Port)
	e := v.engine(withRoutes(
		Route{Domains: []string{"*"}, Senders: []string{"@tenant1.test"}, Nexthop: nexthop, Auth: &Credentials{"tenant1", "pw1"}},
		Route{Domains: []string{"*"}, Senders: []string{"@tenant2.test"}, Nexthop: nexthop, Auth: &Credentials{"tenant2", "pw2"}},
	), func(o *Options) { o.IdleTimeout = time.Minute })
	for _, from := range []string{"a@tenant1.test", "b@tenant2.test", "c@tenant1.test", "d@tenant2.test"} {
		job := testJob("example.org", "x@example.org")
		job.Envelope.From = from
		if st := deliver(t, e, job); !st[0].Delivered() {
			t.Fatal(st[0])
		}
	}
	for _, m := range up.messages() {
		if want := strings.TrimSuffix(strings.Split(m.from, "@")[1], ".test"); m.account != want {
			t.Errorf("mail from %s went over %s's connection", m.from, m.account)
		}
	}
	if _, _, _, conns := up.stats(); conns != 2 {
		t.Errorf("%d connections, want one per account, each reused", conns)
	}
}

// A reload that changes a route's account does not reuse the connection
// the old account logged in on.
func TestReloadedAccountGetsItsOwnConnection(t *testing.T) {
	v := newEnv(t, "smtp.provider.test. 300 IN A 127.0.0.1")
	up := newUpstream(t, nil, upSTARTTLS(v.ca.Issue(t, "smtp.provider.test")), upAuth("tenant1", "pw1"), upAuth("tenant2", "pw2"))
	route := func(user, pass string) Route {
		return Route{Name: "r", Domains: []string{"*"}, Nexthop: "[smtp.provider.test]:" + strconv.Itoa(up.Port), Auth: &Credentials{user, pass}}
	}
	e := v.engine(withRoutes(route("tenant1", "pw1")), func(o *Options) { o.IdleTimeout = time.Minute })
	deliver(t, e, testJob("example.org", "x@example.org"))
	if err := e.SetRoutes(nil, []Route{route("tenant2", "pw2")}, nil); err != nil {
		t.Fatal(err)
	}
	deliver(t, e, testJob("example.org", "y@example.org"))
	m := up.messages()
	if len(m) != 2 || m[0].account != "tenant1" || m[1].account != "tenant2" {
		t.Errorf("messages went as %+v; want tenant1 then tenant2", m)
	}
}
