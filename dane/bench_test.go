package dane

import (
	"context"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/resolve"
)

// BenchmarkRequirementsWithoutDANE is the DANE share of a delivery to the
// common destination that has none: an MX RRset that is not DNSSEC-signed,
// and a signed one whose host publishes no TLSA records (answered from
// the resolver's cache).
//
//	go test -run '^$' -bench BenchmarkRequirementsWithoutDANE -benchmem ./dane/
func BenchmarkRequirementsWithoutDANE(b *testing.B) {
	z := dnstest.New(b, "mx.example.test. 300 IN A 192.0.2.1")
	z.Secure("mx.example.test.", "_25._tcp.mx.example.test.")
	res, err := resolve.New(resolve.Config{Servers: []string{z.Addr}, Timeout: time.Second})
	if err != nil {
		b.Fatal(err)
	}
	src, err := New(Options{Resolver: res})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	for _, bc := range []struct {
		name string
		mx   policy.MX
	}{
		{"insecure-MX", policy.MX{Name: "mx.example.test", Final: "mx.example.test"}},
		{"secure-no-TLSA", policy.MX{Name: "mx.example.test", Final: "mx.example.test", MXSecure: true, AddrSecure: true}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			mxs := []policy.MX{bc.mx}
			reqs, err := src.Requirements(ctx, "example.test", mxs)
			if err != nil || reqs[0].Policy != nil {
				b.Fatalf("got %v, %v; want no DANE policy", reqs, err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := src.Requirements(ctx, "example.test", mxs); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
