package delivery

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/policy"
)

// BenchmarkDeliver measures one delivery to a loopback go-smtp server, with
// and without a (cached, instant) TLS requirement, over a reused connection
// and over a new one each time. go-smtp's server offers PIPELINING, so
// the envelope goes as one group (RFC 2920):
//
//	go test -run '^$' -bench BenchmarkDeliver -benchmem ./delivery/
func BenchmarkDeliver(b *testing.B) {
	for _, bc := range []struct {
		name   string
		tls    bool
		policy policy.PolicySource
		idle   time.Duration
		rcpts  int
	}{
		{"plaintext/reuse", false, nil, 5 * time.Second, 1},
		{"opportunistic-tls/reuse", true, nil, 5 * time.Second, 1},
		{"opportunistic-tls/reuse/5-rcpt", true, nil, 5 * time.Second, 5},
		{"sts-verify/reuse", true, everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS}), 5 * time.Second, 1},
		{"opportunistic-tls/new-connection", true, nil, -1, 1},
		{"sts-verify/new-connection", true, everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS}), -1, 1},
	} {
		b.Run(bc.name, func(b *testing.B) {
			v := newEnv(b,
				"example.test. 300 IN MX 10 mx1.example.test.",
				"mx1.example.test. 300 IN A 127.0.0.2")
			var opts []mxOption
			if bc.tls {
				opts = append(opts, withTLS(v.ca.Issue(b, "mx1.example.test")))
			}
			mx := newMX(b, opts...)
			v.route("127.0.0.2", mx.Addr)
			e := v.engine(func(o *Options) {
				o.Policy = bc.policy
				o.IdleTimeout = bc.idle
				o.Recorder = nil
				o.Logger = slog.New(slog.DiscardHandler)
			})
			var rcpts []string
			for i := range bc.rcpts {
				rcpts = append(rcpts, fmt.Sprintf("r%d@example.test", i))
			}
			job := testJob("example.test", rcpts...)
			ctx := context.Background()
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				for _, st := range e.Deliver(ctx, job) {
					if !st.Delivered() {
						b.Fatal(st)
					}
				}
			}
		})
	}
}

// BenchmarkTLSResumption measures a delivery over a new connection each
// time to a STARTTLS server under an MTA-STS verify requirement, with full
// handshakes (no session cache) and with resumed ones; run both in one
// invocation and compare them:
//
//	go test -run '^$' -bench BenchmarkTLSResumption -count 5 ./delivery/
func BenchmarkTLSResumption(b *testing.B) {
	for _, bc := range []struct {
		name  string
		cache int
	}{{"full-handshake", -1}, {"resumed", 0}} {
		b.Run(bc.name, func(b *testing.B) {
			v := newEnv(b,
				"example.test. 300 IN MX 10 mx1.example.test.",
				"mx1.example.test. 300 IN A 127.0.0.2")
			mx := newMX(b, withTLS(v.ca.Issue(b, "mx1.example.test")))
			v.route("127.0.0.2", mx.Addr)
			e := v.engine(func(o *Options) {
				o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS})
				o.IdleTimeout = -1
				o.TLSSessionCacheSize = bc.cache
				o.Recorder = nil
				o.Logger = slog.New(slog.DiscardHandler)
			})
			job := testJob("example.test", "a@example.test")
			ctx := context.Background()
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				if st := e.Deliver(ctx, job); !st[0].Delivered() {
					b.Fatal(st[0])
				}
			}
		})
	}
}

// BenchmarkReplyStatus is the Status made of a remote's reply to every
// delivered message, and its log form.
//
//	go test -run '^$' -bench BenchmarkReplyStatus -benchmem ./delivery/
func BenchmarkReplyStatus(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		st := replyStatus("mx1.example.test[127.0.0.2]", 250, "2.0.0 OK: queued as 4ZK3f21Xyz")
		if st.String() == "" {
			b.Fatal("empty status")
		}
	}
}
