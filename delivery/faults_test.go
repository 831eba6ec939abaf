package delivery

import (
	"bytes"
	"net"
	"runtime"
	"runtime/pprof"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/internal/faultproxy"
	"github.com/stsrelay/stsrelay/policy"
)

// Network faults between the engine and a real go-smtp MX, injected by a
// TCP proxy, and DNS faults from the test resolver. Each case checks the
// outcome and its code, that the remote stored what it should (never a
// duplicate it had not accepted), and that no goroutine is left behind.

// proxiedMX is oneMX with a fault proxy in front of the MX: the engine's
// connections to mx1.example.test go through it.
func proxiedMX(t *testing.T, mxOpts []mxOption, rules ...faultproxy.Rule) (*testEnv, *testMX, *faultproxy.Proxy) {
	t.Helper()
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2")
	mx := newMX(t, mxOpts...)
	p := faultproxy.New(t, mx.Addr, rules...)
	v.route("127.0.0.2", p.Addr)
	return v, mx, p
}

// settled waits, a bounded time, for the goroutine count to come back to
// baseline; it fails with a dump of them if it does not.
func settled(t *testing.T, baseline int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > baseline {
		if time.Now().After(deadline) {
			var b bytes.Buffer
			pprof.Lookup("goroutine").WriteTo(&b, 1)
			t.Fatalf("%d goroutines 10s after the case, %d before:\n%s", runtime.NumGoroutine(), baseline, b.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// timeouts shortens the engine's SMTP timeouts for the stalling cases.
func timeouts(d time.Duration) func(*Options) {
	return func(o *Options) {
		o.Timeouts = Timeouts{Greeting: d, Command: d, Mail: d, Rcpt: d, DataInit: d, DataBlock: d, DataFinal: d}
	}
}

func TestFaultGreetingDelayedPastTheTimeoutDefers(t *testing.T) {
	v, mx, _ := proxiedMX(t, nil, faultproxy.Rule{When: "", Then: faultproxy.DelayServer(5 * time.Second)})
	e := v.engine(timeouts(300 * time.Millisecond))
	base := runtime.NumGoroutine()
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.4.2", "mx1.example.test[127.0.0.2]: timeout waiting for the greeting")
	if n := len(mx.messages()); n != 0 {
		t.Fatalf("remote stored %d messages", n)
	}
	settled(t, base)
}

// noChunking keeps the engine to DATA, for cases aimed at its steps.
func noChunking(o *Options) { o.NoChunking = true }

func TestFaultResetDuringDataDefersAndTheRetryDeliversOnce(t *testing.T) {
	v, mx, p := proxiedMX(t, nil, faultproxy.Rule{When: "DATA\r\n", Conn: 1, Then: faultproxy.ResetAfter(20)})
	e := v.engine(noChunking)
	base := runtime.NumGoroutine()
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.4.2", "mx1.example.test[127.0.0.2]: connection lost")
	if n := len(mx.messages()); n != 0 {
		t.Fatalf("remote stored %d messages from a reset transfer", n)
	}
	settled(t, base)

	st = deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if n := len(mx.messages()); n != 1 {
		t.Fatalf("remote stored %d messages, want 1", n)
	}
	if p.Accepted() != 2 {
		t.Fatalf("%d connections, want 2", p.Accepted())
	}
}

// The remote gets the whole message but the final dot, then stops: the
// engine times out and defers; the remote never accepted, so the retry
// is the only copy.
func TestFaultRemoteStallingAfterDataTimesOutAndTheRetryIsNoDuplicate(t *testing.T) {
	v, mx, _ := proxiedMX(t, nil, faultproxy.Rule{When: "\r\n.\r\n", Conn: 1, Then: faultproxy.Stall()})
	e := v.engine(noChunking, func(o *Options) { o.Timeouts.DataFinal = 500 * time.Millisecond })
	base := runtime.NumGoroutine()
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.4.2", "mx1.example.test[127.0.0.2]: timeout after end of data")
	settled(t, base)
	if n := len(mx.messages()); n != 0 {
		t.Fatalf("remote stored %d messages without the final dot", n)
	}

	st = deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if m := mx.messages(); len(m) != 1 || m[0].data != testBody {
		t.Fatalf("remote stored %d messages, want exactly the retry's", len(m))
	}
}

// The same two faults on the BDAT path (RFC 3030): a reset in the middle
// of the chunk, and a remote that stops reading before the chunk's end,
// so its BDAT never completes. Neither stores anything; the retry is the
// only copy.
func TestFaultBrokenBDATDefersAndTheRetryDeliversOnce(t *testing.T) {
	for _, tc := range []struct {
		name string
		rule faultproxy.Rule
		want string
	}{
		{"reset", faultproxy.Rule{When: " LAST\r\n", Conn: 1, Then: faultproxy.ResetAfter(20)}, "connection lost"},
		// Nothing comes back either: the group's one deadline passes.
		{"stall", faultproxy.Rule{When: "Hello.", Conn: 1, Then: faultproxy.Stall()}, "timeout after MAIL"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, mx, p := proxiedMX(t, nil, tc.rule)
			e := v.engine(timeouts(300 * time.Millisecond))
			base := runtime.NumGoroutine()
			st := deliver(t, e, testJob("example.test", "a@example.test"))
			wantStatus(t, st[0], 451, "4.4.2", "mx1.example.test[127.0.0.2]: "+tc.want)
			settled(t, base)
			if n := len(mx.messages()); n != 0 {
				t.Fatalf("remote stored %d messages from an incomplete BDAT", n)
			}
			if len(p.Fired()) != 1 {
				t.Fatal("the fault never fired: no BDAT went out")
			}
			st = deliver(t, e, testJob("example.test", "a@example.test"))
			wantStatus(t, st[0], 250, "2.0.0")
			if m := mx.messages(); len(m) != 1 || m[0].data != testBody {
				t.Fatalf("remote stored %d messages, want exactly the retry's", len(m))
			}
		})
	}
}

func TestFaultTLSHandshakeAbortedFallsBackToPlaintextWhenOpportunistic(t *testing.T) {
	v, mx, p := proxiedMX(t, []mxOption{withTLS(mustCert(t))},
		faultproxy.Rule{When: "\x16\x03", Conn: 1, Then: faultproxy.Reset()}) // the ClientHello
	e := v.engine()
	base := runtime.NumGoroutine()
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if m := mx.messages(); len(m) != 1 || m[0].tls {
		t.Fatalf("remote got %+v, want one message in plaintext, after the failed handshake", m)
	}
	if p.Accepted() != 2 {
		t.Fatalf("%d connections, want 2 (TLS, then plaintext)", p.Accepted())
	}
	if r := v.rec.results(); len(r) == 0 || r[0].Result != policy.ResultValidationFailure {
		t.Fatalf("TLS results %+v, want the failed handshake recorded", r)
	}
	settled(t, base)
}

func TestFaultTLSHandshakeAbortedDefersWhenTLSIsRequired(t *testing.T) {
	v, mx, p := proxiedMX(t, []mxOption{withTLS(mustCert(t))},
		faultproxy.Rule{When: "\x16\x03", Then: faultproxy.Reset()})
	e := v.engine(func(o *Options) {
		o.Overrides = []Override{{Domains: []string{"example.test"}, TLS: policy.SecurityEncrypt}}
	})
	base := runtime.NumGoroutine()
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.7.5", "TLS handshake failed", "(TLS required by local policy)")
	if n := len(mx.messages()); n != 0 || p.Accepted() != 1 {
		t.Fatalf("remote stored %d messages over %d connections: no plaintext retry allowed", n, p.Accepted())
	}
	settled(t, base)
}

func TestFault421MidSessionDefersEveryRecipient(t *testing.T) {
	v, mx, _ := proxiedMX(t, nil,
		faultproxy.Rule{When: "RCPT TO:", Conn: 1, Then: faultproxy.Reply("421 4.3.2 mx.test shutting down\r\n")})
	e := v.engine()
	base := runtime.NumGoroutine()
	st := deliver(t, e, testJob("example.test", "a@example.test", "b@example.test"))
	for _, s := range st {
		wantStatus(t, s, 421, "4.3.2", "mx1.example.test[127.0.0.2]: 421 4.3.2 mx.test shutting down")
		if s.Permanent() {
			t.Fatal("a 421 failed the recipient")
		}
	}
	settled(t, base)
	st = deliver(t, e, testJob("example.test", "a@example.test", "b@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if m := mx.messages(); len(m) != 1 || len(m[0].rcpts) != 2 {
		t.Fatalf("remote got %+v, want one message to both recipients", m)
	}
}

// RFC 5321 §4.1.1.10: the transaction is complete at the reply to the
// final dot; a remote that never answers QUIT does not undo it.
func TestFaultRemoteNeverAnsweringQUITStillDelivers(t *testing.T) {
	v, mx, p := proxiedMX(t, nil, faultproxy.Rule{When: "QUIT\r\n", Then: faultproxy.Stall()})
	e := v.engine(timeouts(500 * time.Millisecond))
	base := runtime.NumGoroutine()
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if n := len(mx.messages()); n != 1 {
		t.Fatalf("remote stored %d messages", n)
	}
	if f := p.Fired(); len(f) != 1 {
		t.Fatal("the engine never said QUIT")
	}
	settled(t, base)
}

// An endless reply is read no further than the reply bound, whatever the
// remote keeps sending.
func TestFaultEndlessReplyIsReadNoFurtherThanTheBound(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2")
	var sent atomic.Int64
	v.route("127.0.0.2", rawServer(t, func(c net.Conn) {
		line := []byte("220-" + strings.Repeat("x", 1000) + "\r\n")
		for {
			c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			n, err := c.Write(line)
			sent.Add(int64(n))
			if err != nil {
				return
			}
		}
	}))
	e := v.engine()
	base := runtime.NumGoroutine()
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.4.2", "reply too long")
	settled(t, base)
	// What the kernel buffers on both sides, plus the bound.
	if n := sent.Load(); n > 16<<20 {
		t.Fatalf("the remote got %d bytes out before the engine hung up", n)
	}
}

func TestFaultDNSEachEndsInTheRightOutcome(t *testing.T) {
	for _, tc := range []struct {
		name  string
		owner string
		qtype uint16
		fault dnstest.Fault
		code  int
		enh   string
		text  string
	}{
		{"MX SERVFAIL", "example.test", dns.TypeMX, dnstest.FaultServfail, 451, "4.4.3", "MX lookup for example.test: SERVFAIL"},
		{"MX timeout", "example.test", dns.TypeMX, dnstest.FaultDrop, 451, "4.4.3", "MX lookup for example.test: timeout"},
		{"MX answer with the wrong ID", "example.test", dns.TypeMX, dnstest.FaultWrongID, 451, "4.4.3", "MX lookup for example.test: timeout"},
		{"MX wrong ID, then the real answer", "example.test", dns.TypeMX, dnstest.FaultWrongIDFirst, 250, "2.0.0", ""},
		{"MX truncated over UDP", "example.test", dns.TypeMX, dnstest.FaultTruncate, 250, "2.0.0", ""},
		{"address SERVFAIL", "mx1.example.test", 0, dnstest.FaultServfail, 451, "4.4.3", "mx1.example.test"},
		{"address timeout", "mx1.example.test", 0, dnstest.FaultDrop, 451, "4.4.3", "timeout"},
		{"address truncated over UDP", "mx1.example.test", dns.TypeA, dnstest.FaultTruncate, 250, "2.0.0", ""},
		{"address answer with the wrong ID", "mx1.example.test", dns.TypeA, dnstest.FaultWrongID, 451, "4.4.3", "timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, mx := oneMX(t)
			v.dns.SetFault(tc.owner, tc.qtype, tc.fault)
			e := v.engine()
			base := runtime.NumGoroutine()
			st := deliver(t, e, testJob("example.test", "a@example.test"))
			wantStatus(t, st[0], tc.code, tc.enh, tc.text)
			want := 0
			if tc.code == 250 {
				want = 1
			}
			if n := len(mx.messages()); n != want {
				t.Fatalf("remote stored %d messages, want %d", n, want)
			}
			settled(t, base)
		})
	}
}
