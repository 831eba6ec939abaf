package dnssectest

import (
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

func query(t *testing.T, addr, name string, qtype uint16) *dns.Msg {
	t.Helper()
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), qtype)
	q.SetEdns0(1232, true)
	q.AuthenticatedData = true
	r, _, err := (&dns.Client{Timeout: 2 * time.Second}).Exchange(q, addr)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// The validator marks the signed zone secure, the unsigned child insecure,
// and a record whose signature no longer matches bogus (SERVFAIL).
func TestUnboundValidatesTheSignedZone(t *testing.T) {
	e := Start(t, Zone{Name: "sig.test", Records: []string{
		"a.sig.test. 60 IN A 127.0.0.1",
		"b.sig.test. 60 IN TXT \"original\"",
		"child.sig.test. 60 IN NS ns.child.sig.test.",
		"ns.child.sig.test. 60 IN A 127.0.0.1",
	}}, []Zone{{Name: "child.sig.test", Records: []string{"a.child.sig.test. 60 IN A 127.0.0.1"}}},
		func(z string) string { return replaceTXT(z, "original", "tampered") })
	defer func() {
		if t.Failed() {
			t.Log(e.Logs())
		}
	}()
	if r := query(t, e.Resolver, "a.sig.test", dns.TypeA); r.Rcode != dns.RcodeSuccess || !r.AuthenticatedData {
		t.Errorf("signed zone: %v", r)
	}
	if r := query(t, e.Resolver, "a.child.sig.test", dns.TypeA); r.Rcode != dns.RcodeSuccess || r.AuthenticatedData || len(r.Answer) != 1 {
		t.Errorf("unsigned child: %v", r)
	}
	if r := query(t, e.Resolver, "b.sig.test", dns.TypeTXT); r.Rcode != dns.RcodeServerFailure {
		t.Errorf("tampered record: %v", r)
	}
	if r := query(t, e.Authoritative, "b.sig.test", dns.TypeTXT); r.Rcode != dns.RcodeSuccess {
		t.Errorf("nsd itself: %v", r)
	}
}

func replaceTXT(zone, from, to string) string {
	return strings.ReplaceAll(zone, `"`+from+`"`, `"`+to+`"`)
}
