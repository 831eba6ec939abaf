package resolve

import (
	"context"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/dnstest"
)

// BenchmarkCacheHit is what delivery pays per message for its lookups once
// the answers are cached: MX, the host's addresses and the _mta-sts TXT
// record, plus an answer reached through a CNAME.
//
//	go test -run '^$' -bench BenchmarkCacheHit -benchmem ./resolve/
func BenchmarkCacheHit(b *testing.B) {
	s := dnstest.New(b,
		"example.com. 300 IN MX 10 mx.example.com.",
		"mx.example.com. 300 IN A 192.0.2.1",
		"mx.example.com. 300 IN AAAA 2001:db8::1",
		`_mta-sts.example.com. 300 IN TXT "v=STSv1; id=20240101"`,
		"alias.example.com. 300 IN CNAME mx.example.com.")
	r, err := New(Config{Servers: []string{s.Addr}, Timeout: time.Second})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	for _, bc := range []struct {
		name string
		run  func() error
	}{
		{"MX", func() error { _, _, err := r.MX(ctx, "example.com"); return err }},
		{"Addrs", func() error { _, _, err := r.Addrs(ctx, "mx.example.com.", IPBoth); return err }},
		{"TXT", func() error { _, _, err := r.TXT(ctx, "_mta-sts.example.com."); return err }},
		{"CNAME-to-A", func() error { _, err := r.Lookup(ctx, "alias.example.com.", dns.TypeA); return err }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			if err := bc.run(); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			for b.Loop() {
				if err := bc.run(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
