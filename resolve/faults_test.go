package resolve

import (
	"strings"
	"testing"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/dnstest"
)

// An answer whose ID is not the query's is not an answer (RFC 5452 §4.3):
// taking it would let an off-path spoofer in.
func TestAnswerWithWrongIDIsIgnored(t *testing.T) {
	s := dnstest.New(t, "example.com. 300 IN MX 10 mx.example.com.")
	s.SetFault("example.com", dns.TypeMX, dnstest.FaultWrongID)
	_, _, err := newResolver(t, s).MX(t.Context(), "example.com")
	e := lookupErr(t, err)
	if !e.Temporary() || !strings.Contains(err.Error(), "timeout") {
		t.Fatalf("err = %v, want a temporary timeout", err)
	}
}

func TestWrongIDAnswerBeforeTheRealOneIsSkipped(t *testing.T) {
	s := dnstest.New(t, "example.com. 300 IN MX 10 mx.example.com.")
	s.SetFault("example.com", dns.TypeMX, dnstest.FaultWrongIDFirst)
	mxs, _, err := newResolver(t, s).MX(t.Context(), "example.com")
	if err != nil || len(mxs) != 1 || mxs[0].Mx != "mx.example.com." {
		t.Fatalf("MX = %v, %v; want the real answer, not the SERVFAIL with the wrong ID", mxs, err)
	}
}
