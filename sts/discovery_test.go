package sts_test

import (
	"context"
	"errors"
	"testing"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/resolve"
	"github.com/stsrelay/stsrelay/sts"
)

func lookup(t *testing.T, records ...string) (*sts.Record, *sts.Discovery, error) {
	t.Helper()
	srv := dnstest.New(t, records...)
	res, err := resolve.New(resolve.Config{Servers: []string{srv.Addr}})
	if err != nil {
		t.Fatal(err)
	}
	return sts.LookupRecord(context.Background(), res, "example.com")
}

func TestLookupRecordFindsTheSTSv1Record(t *testing.T) {
	rec, _, err := lookup(t, `_mta-sts.example.com. 300 IN TXT "v=STSv1; id=20240101"`)
	if err != nil || rec.ID != "20240101" {
		t.Fatalf("got %+v, %v", rec, err)
	}
}

func TestLookupRecordWithoutRecordIsNoRecord(t *testing.T) {
	_, _, err := lookup(t, `example.com. 300 IN MX 10 mx.example.com.`)
	if !errors.Is(err, sts.ErrNoRecord) {
		t.Fatalf("err = %v, want ErrNoRecord", err)
	}
}

func TestLookupRecordFollowsCNAMEToHostingProvider(t *testing.T) {
	rec, d, err := lookup(t,
		`_mta-sts.example.com. 300 IN CNAME example-com._mta-sts.provider.net.`,
		`example-com._mta-sts.provider.net. 300 IN TXT "v=STSv1; id=hosted1"`)
	if err != nil || rec.ID != "hosted1" {
		t.Fatalf("got %+v, %v", rec, err)
	}
	if len(d.CNAMEs) != 1 || d.CNAMEs[0] != "example-com._mta-sts.provider.net." {
		t.Fatalf("CNAMEs = %q", d.CNAMEs)
	}
}

func TestLookupRecordIgnoresOtherVersionRecords(t *testing.T) {
	rec, d, err := lookup(t,
		`_mta-sts.example.com. 300 IN TXT "v=spf1 -all"`,
		`_mta-sts.example.com. 300 IN TXT "v=STSv10; id=other"`,
		`_mta-sts.example.com. 300 IN TXT "some verification token"`,
		`_mta-sts.example.com. 300 IN TXT "v=STSv1; id=real"`)
	if err != nil || rec.ID != "real" {
		t.Fatalf("got %+v, %v", rec, err)
	}
	if len(d.Others) != 3 {
		t.Fatalf("Others = %q", d.Others)
	}
}

func TestLookupRecordTwoSTSv1RecordsMeanNoPolicy(t *testing.T) {
	_, _, err := lookup(t,
		`_mta-sts.example.com. 300 IN TXT "v=STSv1; id=one"`,
		`_mta-sts.example.com. 300 IN TXT "v=STSv1; id=two"`)
	if !errors.Is(err, sts.ErrMultipleRecords) {
		t.Fatalf("err = %v, want ErrMultipleRecords", err)
	}
}

func TestLookupRecordConcatenatesMultiStringTXT(t *testing.T) {
	rec, _, err := lookup(t, `_mta-sts.example.com. 300 IN TXT "v=STSv1; id=abc" "def"`)
	if err != nil || rec.ID != "abcdef" {
		t.Fatalf("got %+v, %v; want id abcdef (strings joined without spaces)", rec, err)
	}
}

func TestLookupRecordBadIDIsInvalidRecordNotDNSFailure(t *testing.T) {
	_, _, err := lookup(t, `_mta-sts.example.com. 300 IN TXT "v=STSv1; id=2016-08-31"`)
	var re *sts.RecordError
	if !errors.As(err, &re) {
		t.Fatalf("err = %v, want *RecordError", err)
	}
}

func TestLookupRecordServfailIsDNSError(t *testing.T) {
	srv := dnstest.New(t)
	srv.SetFault("_mta-sts.example.com.", 0, dnstest.FaultServfail)
	res, _ := resolve.New(resolve.Config{Servers: []string{srv.Addr}})
	_, _, err := sts.LookupRecord(context.Background(), res, "example.com")
	var de *resolve.Error
	if !errors.As(err, &de) || !de.Temporary() {
		t.Fatalf("err = %v, want a temporary *resolve.Error", err)
	}
}

func TestInvalidRecordMeansNoPolicyWithoutFetching(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "", enforcePolicy)
	e.DNS.Add(t, `_mta-sts.example.com. 300 IN TXT "v=STSv1; id=has_underscore"`)
	m := e.Manager(nil)
	_, err := m.Policy(context.Background(), "example.com")
	var re *sts.RecordError
	if !errors.Is(err, sts.ErrNoPolicy) || !errors.As(err, &re) {
		t.Fatalf("err = %v, want ErrNoPolicy wrapping a *RecordError", err)
	}
	if n := h.requests.Load(); n != 0 {
		t.Fatalf("policy host got %d requests for an invalid TXT record", n)
	}
}

func TestPolicyDomainIsNeverTheParent(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "parent1", enforcePolicy)
	m := e.Manager(nil)
	// RFC 8461 §3.4: mail for sub.example.com looks up _mta-sts.sub.example.com only.
	if _, err := m.Policy(context.Background(), "sub.example.com"); !errors.Is(err, sts.ErrNoPolicy) {
		t.Fatalf("err = %v, want ErrNoPolicy", err)
	}
	if h.requests.Load() != 0 || e.DNS.Queries("_mta-sts.example.com.", 0) != 0 {
		t.Fatal("the parent domain's policy was consulted")
	}
}

func TestAddressLiteralHasNoPolicy(t *testing.T) {
	e := newEnv(t)
	m := e.Manager(nil)
	for _, d := range []string{"[192.0.2.1]", "192.0.2.1", "[IPv6:2001:db8::1]"} {
		if _, err := m.Policy(context.Background(), d); !errors.Is(err, sts.ErrAddressLiteral) || !errors.Is(err, sts.ErrNoPolicy) {
			t.Errorf("Policy(%q) err = %v, want ErrNoPolicy and ErrAddressLiteral", d, err)
		}
	}
}

func TestTXTLookupFailureWithoutCacheMeansNoPolicy(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	e.DNS.SetFault("_mta-sts.example.com.", 0, dnstest.FaultServfail)
	cp, err := e.Manager(nil).Policy(context.Background(), "example.com")
	var de *resolve.Error
	if !errors.Is(err, sts.ErrNoPolicy) || !errors.As(err, &de) {
		t.Fatalf("got %+v, %v; want ErrNoPolicy wrapping the DNS error", cp, err)
	}
	if h.requests.Load() != 0 {
		t.Fatal("fetched a policy without a TXT record")
	}
}
