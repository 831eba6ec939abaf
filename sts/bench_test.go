package sts_test

import (
	"github.com/stsrelay/stsrelay/policy"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/resolve"
)

// BenchmarkDeliver compares a delivery to a domain with a cached enforce
// policy against one to a domain without MTA-STS, both through the delivery
// engine over STARTTLS to a loopback go-smtp server, with the resolver's TTL
// cache on as in production. The difference is the cost of MTA-STS on the
// hot path: a cached TXT lookup, a map lookup and PKIX verification.
//
//	go test -run '^$' -bench BenchmarkDeliver -benchtime 3s -count 6 ./sts/
func BenchmarkDeliver(b *testing.B) {
	for _, reuse := range []struct {
		name string
		idle time.Duration
	}{{"new-connection", -1}, {"reused-connection", 10 * time.Second}} {
		for _, domain := range []string{"enforce.test", "nopolicy.test"} {
			b.Run(reuse.name+"/"+domain, func(b *testing.B) {
				e := cachingEnv(b)
				e.ValidHost("enforce.test", "id1", "version: STSv1\nmode: enforce\nmx: mx.enforce.test\nmax_age: 86400\n")
				for _, d := range []string{"enforce.test", "nopolicy.test"} {
					cert := e.CA.Issue(b, "mx."+d)
					e.MX(d, "mx."+d, &cert)
				}
				m := e.Manager(nil)
				eng := e.EngineWith(m, reuse.idle)
				// Warm the caches (DNS, policy) before measuring.
				if st := eng.Deliver(ctx, job(domain)); !st[0].Delivered() {
					b.Fatalf("warm-up: %s", st[0])
				}
				for b.Loop() {
					if st := eng.Deliver(ctx, job(domain)); !st[0].Delivered() {
						b.Fatalf("%s", st[0])
					}
				}
			})
		}
	}
}

// BenchmarkRequirements is the MTA-STS share of each delivery on its own:
// the PolicySource call for a domain with a cached enforce policy and for a
// domain without a policy, with the resolver's cache warm.
//
//	go test -run '^$' -bench BenchmarkRequirements ./sts/
func BenchmarkRequirements(b *testing.B) {
	e := cachingEnv(b)
	e.ValidHost("enforce.test", "id1", "version: STSv1\nmode: enforce\nmx: mx.enforce.test\nmax_age: 86400\n")
	e.DNS.Add(b, `_mta-sts.nopolicy.test. 300 IN TXT "v=spf1 -all"`)
	m := e.Manager(nil)
	for _, domain := range []string{"enforce.test", "nopolicy.test"} {
		b.Run(domain, func(b *testing.B) {
			mxs := []policy.MX{{Name: "mx." + domain, Final: "mx." + domain, Preference: 10}}
			if _, err := m.Requirements(ctx, domain, mxs); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := m.Requirements(ctx, domain, mxs); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkFetch is a policy fetch over a new connection, as every fetch
// is: DNS from the warm cache, the TCP and TLS handshakes on both ends
// (the server runs in this process), the GET and the parse. It is what a
// first contact with a domain costs beside the delivery's own handshake.
//
//	go test -run '^$' -bench BenchmarkFetch -benchtime 3s -count 6 ./sts/
func BenchmarkFetch(b *testing.B) {
	e := cachingEnv(b)
	e.ValidHost("enforce.test", "id1", "version: STSv1\nmode: enforce\nmx: mx.enforce.test\nmax_age: 86400\n")
	m := e.Manager(nil)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := m.Fetch(ctx, "enforce.test"); err != nil {
			b.Fatal(err)
		}
	}
}

// cachingEnv is newEnv with a resolver that keeps its TTL cache, as in
// production; the benchmarks measure the warm path.
func cachingEnv(b *testing.B) *env {
	e := newEnv(b)
	res, err := resolve.New(resolve.Config{Servers: []string{e.DNS.Addr}, Timeout: time.Second})
	if err != nil {
		b.Fatal(err)
	}
	e.Res = res
	return e
}
