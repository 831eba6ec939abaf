package delivery

import (
	"context"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/resolve"
)

func TestDeliversToBestMXFirst(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 20 mx2.example.test.",
		"example.test. 300 IN MX 10 mx1.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	mx1, mx2 := newMX(t), newMX(t)
	v.route("127.0.0.2", mx1.Addr)
	v.route("127.0.0.3", mx2.Addr)

	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "mx1.example.test[127.0.0.2]: 250 2.0.0")
	if st[0].RemoteMTA != "mx1.example.test" {
		t.Errorf("RemoteMTA = %q, want mx1.example.test", st[0].RemoteMTA)
	}
	if len(mx1.messages()) != 1 || mx2.sessionCount() != 0 {
		t.Errorf("mx1 got %d messages, mx2 %d sessions; want 1 and 0", len(mx1.messages()), mx2.sessionCount())
	}
	if got := mx1.messages()[0].data; got != testBody {
		t.Errorf("message arrived as %q, want %q", got, testBody)
	}
}

func TestNextMXTriedWhenFirstRefusesConnection(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	mx2 := newMX(t)
	v.route("127.0.0.3", mx2.Addr) // 127.0.0.2 refuses

	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "mx2.example.test[127.0.0.3]")
}

func TestSecondAddressOfMXTriedWhenFirstRefuses(t *testing.T) {
	// RFC 5321 §5.1: at least two addresses are tried.
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx1.example.test. 300 IN A 127.0.0.3")
	mx := newMX(t)
	v.route("127.0.0.3", mx.Addr)

	for range 5 { // the resolver's order is not ours to fix; try a few
		st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
		wantStatus(t, st[0], 250, "2.0.0", "[127.0.0.3]")
	}
}

func TestAllMXRefusingDefersWithEveryHostNamed(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.4.1",
		"mx1.example.test[127.0.0.2]: connection refused", "mx2.example.test[127.0.0.3]: connection refused")
	if st[0].RemoteMTA != "" {
		t.Errorf("RemoteMTA = %q for a failure without a reply", st[0].RemoteMTA)
	}
}

// A host listed twice among the MX records is one host: tried once, at
// its best preference, before the next one.
func TestHostListedTwiceAmongTheMXIsTriedOnce(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 MX1.example.test.",
		"example.test. 300 IN MX 30 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	var sessions atomic.Int32
	busy := rawServer(t, func(c net.Conn) {
		sessions.Add(1)
		io.WriteString(c, "421 4.3.2 too busy\r\n")
	})
	mx2 := newMX(t)
	v.route("127.0.0.2", busy)
	v.route("127.0.0.3", mx2.Addr)
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "mx2.example.test")
	if n := sessions.Load(); n != 1 {
		t.Errorf("mx1 got %d sessions, want 1", n)
	}
}

func TestEqualPreferenceMXOrderIsRandom(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 10 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	mx1, mx2 := newMX(t), newMX(t)
	v.route("127.0.0.2", mx1.Addr)
	v.route("127.0.0.3", mx2.Addr)
	e := v.engine()
	for range 30 {
		deliver(t, e, testJob("example.test", "a@example.test"))
	}
	// Both get some: all 30 on one host has probability 2^-29.
	if len(mx1.messages()) == 0 || len(mx2.messages()) == 0 {
		t.Errorf("mx1 got %d, mx2 %d messages; equal preferences must share", len(mx1.messages()), len(mx2.messages()))
	}
}

func TestNullMXFailsPermanently(t *testing.T) {
	v := newEnv(t, "example.test. 300 IN MX 0 .")
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test", "b@example.test"))
	for _, s := range st {
		wantStatus(t, s, 550, "5.1.10", "example.test does not accept mail (null MX)")
	}
}

func TestNullMXMixedWithOtherMXUsesTheOthers(t *testing.T) {
	// RFC 7505 §3 forbids the mix; we decided to deliver to the real hosts.
	v := newEnv(t,
		"example.test. 300 IN MX 0 .",
		"example.test. 300 IN MX 10 mx1.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2")
	mx := newMX(t)
	v.route("127.0.0.2", mx.Addr)
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
}

func TestNXDOMAINFailsPermanently(t *testing.T) {
	v := newEnv(t, "other.test. 300 IN MX 10 mx1.other.test.")
	st := deliver(t, v.engine(), testJob("nowhere.test", "a@nowhere.test"))
	wantStatus(t, st[0], 550, "5.1.2", "nowhere.test does not exist")
}

func TestDNSFailureDefersNeverBounces(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fault dnstest.Fault
		want  string
	}{
		{"servfail", dnstest.FaultServfail, "SERVFAIL"},
		{"refused", dnstest.FaultRefused, "REFUSED"},
		{"timeout", dnstest.FaultDrop, "timeout"},
		{"garbage", dnstest.FaultGarbage, "MX lookup for example.test"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := newEnv(t, "example.test. 300 IN MX 10 mx1.example.test.")
			v.dns.SetFault("example.test", dns.TypeMX, tc.fault)
			st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
			wantStatus(t, st[0], 451, "4.4.3", tc.want)
		})
	}
}

func TestImplicitMXUsesTheDomainsAddress(t *testing.T) {
	v := newEnv(t, "example.test. 300 IN A 127.0.0.2")
	mx := newMX(t)
	v.route("127.0.0.2", mx.Addr)
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "example.test[127.0.0.2]")
}

func TestNoMXAndNoAddressFailsPermanently(t *testing.T) {
	v := newEnv(t, "example.test. 300 IN TXT \"v=spf1 -all\"")
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 550, "5.4.4", "no MX records and no address")
}

func TestNoMXAndAFailingAddressLookupDefers(t *testing.T) {
	// AAAA says "none", A fails: the domain may have an IPv4 address, so
	// this is a DNS failure to retry, never "no address" (RFC 5321 §5.1).
	v := newEnv(t, "example.test. 300 IN TXT \"v=spf1 -all\"")
	v.dns.SetFault("example.test", dns.TypeA, dnstest.FaultServfail)
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	if st[0].Permanent() {
		t.Fatalf("status %s: a temporary DNS failure bounced the message", st[0])
	}
	wantStatus(t, st[0], 451, "4.4.3")
}

func TestMXRecordsPresentNeverFallBackToDomainAddress(t *testing.T) {
	// RFC 5321 §5.1: with MX records, the domain's own A is not a route.
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN A 127.0.0.5")
	mx := newMX(t)
	v.route("127.0.0.5", mx.Addr)
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.4.4", "mx1.example.test: host name does not exist")
	if mx.sessionCount() != 0 {
		t.Error("the domain's own address was dialed although it has MX records")
	}
}

func TestMXCNAMEChainIsFollowedAndBothNamesKept(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx.example.test.",
		"mx.example.test. 300 IN CNAME a.provider.test.",
		"a.provider.test. 300 IN CNAME b.provider.test.",
		"b.provider.test. 300 IN A 127.0.0.2")
	mx := newMX(t)
	v.route("127.0.0.2", mx.Addr)
	var seen []policy.MX
	policy := policyFunc(func(_ context.Context, _ string, mxs []policy.MX) ([]policy.Requirement, error) {
		seen = append(seen, mxs...)
		return make([]policy.Requirement, len(mxs)), nil
	})
	st := deliver(t, v.engine(func(o *Options) { o.Policy = policy }), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "mx.example.test[127.0.0.2]")
	if len(seen) != 1 {
		t.Fatalf("policy saw %d MX hosts, want 1", len(seen))
	}
	got := seen[0]
	if got.Name != "mx.example.test" || got.Final != "b.provider.test" ||
		!slices.Equal(got.CNAMEs, []string{"a.provider.test", "b.provider.test"}) || got.Preference != 10 {
		t.Errorf("policy saw %+v, want Name mx.example.test, Final b.provider.test, CNAMEs [a.provider.test b.provider.test]", got)
	}
	if got.MXSecure || got.AddrSecure {
		t.Errorf("insecure answers reported secure: %+v", got)
	}

	v.dns.Secure("example.test", "mx.example.test", "a.provider.test")
	seen = nil
	deliver(t, v.engine(func(o *Options) { o.Policy = policy }), testJob("example.test", "a@example.test"))
	if !seen[0].MXSecure || seen[0].AddrSecure {
		t.Errorf("MX secure, last alias insecure: got MXSecure %t AddrSecure %t", seen[0].MXSecure, seen[0].AddrSecure)
	}
}

func TestMXWithCNAMELoopIsSkipped(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN CNAME loop1.example.test.",
		"loop1.example.test. 300 IN CNAME mx1.example.test.",
		"mx2.example.test. 300 IN A 127.0.0.3")
	mx2 := newMX(t)
	v.route("127.0.0.3", mx2.Addr)
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "mx2.example.test")

	v.dns.Remove("mx2.example.test", 0)
	v.dns.Add(t, "mx2.example.test. 300 IN CNAME mx2.example.test.")
	st = deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.4.3", "mx1.example.test", "CNAME chain too long or looping")
}

func TestMXPointingToIPAddressIsSkipped(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 127.0.0.2.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx2.example.test. 300 IN A 127.0.0.3")
	bad, good := newMX(t), newMX(t)
	v.route("127.0.0.2", bad.Addr)
	v.route("127.0.0.3", good.Addr)
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "mx2.example.test")
	if want := `hosts_not_used="127.0.0.2: MX target is an IP address`; !strings.Contains(v.logs.String(), want) {
		t.Errorf("log does not say why the MX was skipped (%s):\n%s", want, v.logs.String())
	}

	v.dns.Remove("example.test", dns.TypeMX)
	v.dns.Add(t, "example.test. 300 IN MX 10 127.0.0.2.")
	st = deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.4.4", "127.0.0.2: MX target is an IP address, not a host name")
	if bad.sessionCount() != 0 {
		t.Error("an MX target that is an IP literal was dialed")
	}
}

func TestMXWithoutAddressIsSkipped(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN TXT \"no address here\"",
		"mx2.example.test. 300 IN A 127.0.0.3")
	mx2 := newMX(t)
	v.route("127.0.0.3", mx2.Addr)
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "mx2.example.test")
}

func TestAddressLookupFailureOfOneMXMovesOn(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	v.dns.SetFault("mx1.example.test", 0, dnstest.FaultServfail)
	mx2 := newMX(t)
	v.route("127.0.0.3", mx2.Addr)
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "mx2.example.test")

	v.dns.SetFault("mx2.example.test", 0, dnstest.FaultServfail)
	st = deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.4.3", "mx1.example.test: ", "SERVFAIL")
}

func TestOwnHostnameDropsItsPreferenceAndWorse(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 relay.sender.test.",
		"example.test. 300 IN MX 20 peer.example.test.",
		"example.test. 300 IN MX 30 mx3.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"peer.example.test. 300 IN A 127.0.0.3",
		"mx3.example.test. 300 IN A 127.0.0.4",
		"relay.sender.test. 300 IN A 127.0.0.5")
	peer, mx3, self := newMX(t), newMX(t), newMX(t)
	v.route("127.0.0.3", peer.Addr)
	v.route("127.0.0.4", mx3.Addr)
	v.route("127.0.0.5", self.Addr)
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test")) // mx1 refuses
	wantStatus(t, st[0], 451, "4.4.1", "mx1.example.test[127.0.0.2]: connection refused")
	if n := peer.sessionCount() + mx3.sessionCount() + self.sessionCount(); n != 0 {
		t.Errorf("%d sessions to hosts at or below our own preference, want 0", n)
	}
}

func TestOwnHostnameAsBestMXFailsInsteadOfLooping(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 RELAY.sender.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"relay.sender.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 550, "5.4.6", "loops back to myself")
}

func TestIPVersionSelectsAddressFamily(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx1.example.test. 300 IN AAAA ::1")
	v4, v6 := newMX(t), newMX(t)
	v.route("127.0.0.2", v4.Addr)
	v.route("::1", v6.Addr)
	for _, tc := range []struct {
		version resolve.IPVersion
		want    string
	}{
		{resolve.IPBoth, "[::1]"}, // IPv6 first (RFC 6724)
		{resolve.IPv4, "[127.0.0.2]"},
		{resolve.IPv6, "[::1]"},
	} {
		st := deliver(t, v.engine(func(o *Options) { o.IPVersion = tc.version }), testJob("example.test", "a@example.test"))
		wantStatus(t, st[0], 250, "2.0.0", tc.want)
	}
	// Both families tried: IPv6 refusing falls back to IPv4.
	v.route("::1", v.closed)
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "[127.0.0.2]")
}

func TestTruncatedMXAnswerRetriedOverTCP(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2")
	v.dns.SetFault("example.test", dns.TypeMX, dnstest.FaultTruncate)
	mx := newMX(t)
	v.route("127.0.0.2", mx.Addr)
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
}

func TestLogLineStatesOutcomePolicyHostAndDuration(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2")
	mx := newMX(t, withTLS(v.ca.Issue(t, "mx1.example.test")))
	v.route("127.0.0.2", mx.Addr)
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS})
	})
	deliver(t, e, testJob("example.test", "a@example.test"))
	logs := v.logs.String()
	for _, want := range []string{"id=J1", "outcome=delivered", "policy=mta-sts/verify", "mx=mx1.example.test",
		"ip=127.0.0.2", "tls=TLSv1.3", `tls_auth="verified TLS, MTA-STS enforce"`, "cert_name=mx1.example.test", "took="} {
		if !strings.Contains(logs, want) {
			t.Errorf("log line lacks %q:\n%s", want, logs)
		}
	}
}

// The name the certificate matched is found at the handshake; a reused
// connection carries it to the log line of each of its messages.
func TestLogLineNamesTheMatchedCertificateNameOnEveryMessageOfAConnection(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2")
	mx := newMX(t, withTLS(v.ca.Issue(t, "mail.provider.test")))
	v.route("127.0.0.2", mx.Addr)
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS,
			Names: []string{"mx1.example.test", "mail.provider.test", "other.provider.test"}})
		o.IdleTimeout = 10 * time.Second
	})
	for range 3 {
		wantStatus(t, deliver(t, e, testJob("example.test", "a@example.test"))[0], 250, "2.0.0")
	}
	lines := strings.Split(strings.TrimSpace(v.logs.String()), "\n")
	var attempts []string
	for _, l := range lines {
		if strings.Contains(l, "delivery attempt") {
			attempts = append(attempts, l)
		}
	}
	if len(attempts) != 3 {
		t.Fatalf("%d attempt lines, want 3:\n%s", len(attempts), v.logs.String())
	}
	for i, l := range attempts {
		if !strings.Contains(l, "cert_name=mail.provider.test") || strings.Contains(l, "reused=true") != (i > 0) {
			t.Errorf("attempt %d: want cert_name=mail.provider.test and reused=%v:\n%s", i+1, i > 0, l)
		}
	}
}

func TestAddressLiteralIsDeliveredWithoutDNSOrPolicy(t *testing.T) {
	v := newEnv(t)
	mx := newMX(t, withTLS(mustCert(t)))
	v.route("127.0.0.2", mx.Addr)
	asked := false
	e := v.engine(func(o *Options) {
		o.Policy = policyFunc(func(_ ctxT, _ string, mxs []policy.MX) ([]policy.Requirement, error) {
			asked = true
			return make([]policy.Requirement, len(mxs)), nil
		})
	})
	st := deliver(t, e, testJob("[127.0.0.2]", "a@[127.0.0.2]"))
	wantStatus(t, st[0], 250, "2.0.0", "[127.0.0.2]: 250")
	if asked {
		t.Error("the policy source was asked about an address literal (RFC 8461 §3.4)")
	}
	if m := mx.messages(); len(m) != 1 || !m[0].tls {
		t.Errorf("want one message over TLS, got %+v", m)
	}
	st = deliver(t, e, testJob("[IPv6:::1]", "a@[IPv6:::1]"))
	wantStatus(t, st[0], 451, "4.4.1", "[ipv6:::1]: connection refused")
	st = deliver(t, e, testJob("[not-an-ip]", "a@[not-an-ip]"))
	wantStatus(t, st[0], 550, "5.1.2", "not a valid address literal")
}

// The attempt's connections (MaxConnectionsPerAttempt) are shared by its hosts: a
// host tries at most what the hosts after it do not need, one each, so
// a primary with many addresses down leaves the backup its connection;
// the last host may use all that is left.
func TestEveryHostLeavesAConnectionForEachHostAfterIt(t *testing.T) {
	for _, tc := range []struct {
		name     string
		backup   bool // mx2, healthy, after mx1
		mx1Dials int
	}{
		{"backup", true, MaxConnectionsPerAttempt - 1},
		{"no backup", false, MaxConnectionsPerAttempt},
	} {
		t.Run(tc.name, func(t *testing.T) {
			records := []string{"example.test. 300 IN MX 10 mx1.example.test."}
			for i := range MaxConnectionsPerAttempt + 2 {
				// All down: refused.
				records = append(records, fmt.Sprintf("mx1.example.test. 300 IN A 127.0.1.%d", i+1))
			}
			if tc.backup {
				records = append(records, "example.test. 300 IN MX 20 mx2.example.test.", "mx2.example.test. 300 IN A 127.0.0.3")
			}
			v := newEnv(t, records...)
			mx2 := newMX(t)
			v.route("127.0.0.3", mx2.Addr)
			d := &dialCounter{v: v}
			e := v.engine(func(o *Options) { o.DialContext = d.dial })
			st := deliver(t, e, testJob("example.test", "a@example.test"))
			if tc.backup {
				wantStatus(t, st[0], 250, "2.0.0", "mx2.example.test[127.0.0.3]")
			} else {
				wantStatus(t, st[0], 451, "4.4.1", "mx1.example.test[127.0.1.", ": connection refused")
			}
			if n := d.total() - d.count("127.0.0.3"); n != tc.mx1Dials {
				t.Errorf("%d connections to mx1's addresses, want %d", n, tc.mx1Dials)
			}
			if n := d.total(); n > MaxConnectionsPerAttempt {
				t.Errorf("%d connections in one attempt, want at most %d", n, MaxConnectionsPerAttempt)
			}
		})
	}
}

// A host the attempt has no connection left for is named, with why, in
// the log line and in the status: it was not tried, so what the others
// said is no answer for it.
func TestHostWithoutAConnectionLeftIsNamed(t *testing.T) {
	var records []string
	for i := range MaxConnectionsPerAttempt + 1 {
		// All down: refused.
		records = append(records,
			fmt.Sprintf("example.test. 300 IN MX %d mx%02d.example.test.", 10*(i+1), i+1),
			fmt.Sprintf("mx%02d.example.test. 300 IN A 127.0.1.%d", i+1, i+1))
	}
	v := newEnv(t, records...)
	d := &dialCounter{v: v}
	e := v.engine(func(o *Options) { o.DialContext = d.dial })
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	last := fmt.Sprintf("mx%02d.example.test", MaxConnectionsPerAttempt+1)
	wantStatus(t, st[0], 451, "4.4.1", "mx01.example.test[127.0.1.1]: connection refused",
		last+": not tried, no connection left in this attempt")
	if n := d.total(); n != MaxConnectionsPerAttempt {
		t.Errorf("%d connections, want %d", n, MaxConnectionsPerAttempt)
	}
	lines := attemptLines(v)
	if len(lines) != 1 || !strings.Contains(lines[0], "hosts_not_used=") ||
		!strings.Contains(lines[0], last+": not tried, no connection left in this attempt") {
		t.Errorf("the log line does not name %s as not tried:\n%s", last, v.logs.String())
	}
}
