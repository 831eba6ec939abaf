package tlsrpt

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/resolve"
)

func TestParseRecordAcceptsWhatRFC8460Allows(t *testing.T) {
	for _, tc := range []struct {
		txt  string
		want []string // usable endpoints: mailbox or URL
	}{
		{"v=TLSRPTv1;rua=mailto:reports@example.com", []string{"reports@example.com"}},
		{"v=TLSRPTv1; rua=https://reporting.example.com/v1/tlsrpt", []string{"https://reporting.example.com/v1/tlsrpt"}},
		{"v=TLSRPTv1; rua=mailto:a@example.com , https://r.example.com/x;", []string{"a@example.com", "https://r.example.com/x"}},
		{"v=TLSRPTv1 ; rua=mailto:a@example.com;ext.x-1=value", []string{"a@example.com"}},
		{"v=TLSRPTv1; rua=mailto:tls%2Brpt@example.com?subject=x", []string{"tls+rpt@example.com"}},
		{"v=TLSRPTv1; rua=MAILTO:a@example.com,HTTPS://r.example.com/", []string{"a@example.com", "https://r.example.com/"}},
		// The domain as the queue routes it: an A-label, no SMTPUTF8 needed.
		{"v=TLSRPTv1; rua=mailto:tlsrpt@B%C3%BCcher.example", []string{"tlsrpt@xn--bcher-kva.example"}},
	} {
		r, err := ParseRecord(tc.txt)
		if err != nil {
			t.Errorf("%q: %v", tc.txt, err)
			continue
		}
		var got []string
		for _, e := range r.Usable() {
			got = append(got, e.Mailbox+e.URL)
		}
		if strings.Join(got, " ") != strings.Join(tc.want, " ") {
			t.Errorf("%q: endpoints %q, want %q", tc.txt, got, tc.want)
		}
	}
}

func TestParseRecordRejectsMalformedRecords(t *testing.T) {
	for _, txt := range []string{
		"v=TLSRPTv1",                           // no rua
		"v=TLSRPTv1;",                          // no rua
		"v=TLSRPTv2; rua=mailto:a@example.com", // another version
		"v=tlsrptv1; rua=mailto:a@example.com", // case-sensitive
		"rua=mailto:a@example.com; v=TLSRPTv1", // version not first
		"v=TLSRPTv1; rua=mailto:a@example.com; rua=mailto:b@example.com",
		"v=TLSRPTv1; rua=",
		"v=TLSRPTv1; rua=mailto:a@example.com,,mailto:b@example.com",
		"v=TLSRPTv1; rua=mailto:a@example.com; nokey",
		"v=TLSRPTv1; rua=mailto:a@example.com; _x=1",
		"v=TLSRPTv1; rua=mailto:a@example.com; x=",
		"v=TLSRPTv1; rua=https://r.example.com/a b",
		"v=TLSRPTv1; rua=no-scheme",
		"v=TLSRPTv1; rua=mailto:a@example.com;;",
	} {
		if r, err := ParseRecord(txt); err == nil {
			t.Errorf("%q parsed as %+v, want an error", txt, r)
		} else if _, ok := err.(*RecordError); !ok {
			t.Errorf("%q: error %T %v, want *RecordError", txt, err, err)
		}
	}
}

func TestRUAThatIsNeitherMailtoNorHTTPSIsKeptButNotUsed(t *testing.T) {
	// "!10m" is DMARC's size limit, not RFC 8460's: the queue would refuse
	// that domain.
	r, err := ParseRecord("v=TLSRPTv1; rua=http://r.example.com/,ftp://x.example/,mailto:not-an-address,mailto:a@r.example.net!10m,mailto:ok@example.com")
	if err != nil {
		t.Fatal(err)
	}
	if len(r.RUA) != 5 {
		t.Fatalf("%d URIs, want 5", len(r.RUA))
	}
	for _, e := range r.RUA[:4] {
		if e.Err == nil {
			t.Errorf("%s: usable, want an error", e.URI)
		}
	}
	if u := r.Usable(); len(u) != 1 || u[0].Mailbox != "ok@example.com" {
		t.Errorf("usable = %+v", u)
	}
}

func testResolver(t *testing.T, dns *dnstest.Server) *resolve.Resolver {
	t.Helper()
	r, err := resolve.New(resolve.Config{Servers: []string{dns.Addr}, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestLookupRecordFindsExactlyOneTLSRPTRecord(t *testing.T) {
	dns := dnstest.New(t,
		`_smtp._tls.one.example. 60 IN TXT "v=TLSRPTv1; rua=mailto:" "tlsrpt@one.example"`,
		`_smtp._tls.one.example. 60 IN TXT "v=spf1 -all"`,
		`_smtp._tls.two.example. 60 IN TXT "v=TLSRPTv1; rua=mailto:a@two.example"`,
		`_smtp._tls.two.example. 60 IN TXT "v=TLSRPTv1; rua=mailto:b@two.example"`,
		`_smtp._tls.bad.example. 60 IN TXT "v=TLSRPTv1; rua=mailto:a@bad.example; rua=mailto:b@bad.example"`,
		`_smtp._tls.other.example. 60 IN TXT "something else"`,
		`_smtp._tls.alias.example. 60 IN CNAME _smtp._tls.one.example.`,
		`nothing.example. 60 IN A 192.0.2.1`,
	)
	dns.SetFault("_smtp._tls.broken.example", 0, dnstest.FaultServfail)
	res := testResolver(t, dns)
	ctx := context.Background()

	for _, d := range []string{"one.example", "alias.example"} {
		r, err := LookupRecord(ctx, res, d)
		if err != nil {
			t.Fatalf("%s: %v", d, err)
		}
		if u := r.Usable(); len(u) != 1 || u[0].Mailbox != "tlsrpt@one.example" {
			t.Errorf("%s: strings not joined as one record: %+v", d, u)
		}
	}
	if _, err := LookupRecord(ctx, res, "two.example"); !errors.Is(err, ErrMultipleRecords) {
		t.Errorf("two records: %v, want ErrMultipleRecords", err)
	}
	for _, d := range []string{"other.example", "nothing.example", "nxdomain.example"} {
		if _, err := LookupRecord(ctx, res, d); !errors.Is(err, ErrNoRecord) {
			t.Errorf("%s: %v, want ErrNoRecord", d, err)
		}
	}
	_, err := LookupRecord(ctx, res, "bad.example")
	if !isNoRecord(err) {
		t.Errorf("invalid record: %v, want it ignored as no record", err)
	}
	_, err = LookupRecord(ctx, res, "broken.example")
	if err == nil || isNoRecord(err) {
		t.Errorf("SERVFAIL: %v, want a DNS error worth retrying", err)
	}
}

func FuzzParseRecord(f *testing.F) {
	seeds, _ := filepath.Glob("testdata/fuzz/FuzzParseRecord/*")
	if len(seeds) == 0 {
		f.Fatal("no seed corpus in testdata/fuzz/FuzzParseRecord")
	}
	f.Fuzz(func(t *testing.T, txt string) {
		r, err := ParseRecord(txt)
		if err != nil {
			if r != nil {
				t.Fatal("a record and an error")
			}
			return
		}
		if !IsRecord(txt) {
			t.Fatalf("%q parsed but IsRecord says it is not one", txt)
		}
		if len(r.RUA) == 0 {
			t.Fatalf("%q parsed without a rua", txt)
		}
		for _, e := range r.Usable() {
			if (e.Mailbox == "") == (e.URL == "") {
				t.Fatalf("%q: usable endpoint %+v is neither mailto nor https", txt, e)
			}
			if e.Mailbox != "" && !validMailbox(e.Mailbox) {
				t.Fatalf("%q: mailbox %q", txt, e.Mailbox)
			}
		}
	})
}

// The corpus files must stay in the go test fuzz format.
func TestFuzzCorpusIsWellFormed(t *testing.T) {
	files, _ := filepath.Glob("testdata/fuzz/FuzzParseRecord/*")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(string(b), "go test fuzz v1\nstring(") {
			t.Errorf("%s is not a go test fuzz v1 file", f)
		}
	}
}
