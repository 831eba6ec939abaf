package dane

import (
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/testpki"
)

// FuzzAuthenticate feeds TLSA RRsets such as any recipient domain may
// publish, hostile ones included, to Records and an Authenticator, and
// checks them against a real chain and an impostor's. Each record takes
// four bytes: usage, selector, matching type (mostly valid values, now
// and then any byte) and what its data is: the association of the
// leaf, of its CA, of the impostor's leaf, or bytes from the input.
//
// Records says why every unusable record is unusable and keeps only the
// strongest digest per usage and selector (RFC 7671 §9); Authenticate
// passes a chain exactly when a usable record matches its leaf (DANE-EE,
// RFC 7672 §3.1.1, or a trust anchor that is the leaf itself) or its CA
// as DANE-TA (§3.1.2). The associations in the checks come from testpki,
// not from the code under test.
func FuzzAuthenticate(f *testing.F) {
	ca, other := testpki.NewCA(f), testpki.NewCA(f)
	leaf := ca.WithChain(ca.Issue(f, "mx.example.test"))
	impostor := other.WithChain(other.Issue(f, "mx.example.test"))
	chain, fake := chainOf(leaf.Certificate...), chainOf(impostor.Certificate...)
	names := []string{"mx.example.test", "example.test"}
	now := time.Now()

	f.Add([]byte{3, 1, 1, 0})                           // 3 1 1, the leaf
	f.Add([]byte{2, 0, 1, 1})                           // 2 0 1, the CA
	f.Add([]byte{3, 1, 1, 2, 32})                       // 3 1 1, 32 bytes of nothing
	f.Add([]byte{3, 1, 1, 3, 3, 1, 2, 0})               // the impostor's leaf, then the leaf by SHA-512
	f.Add([]byte{3, 1, 1, 0, 3, 1, 2, 3})               // the leaf by SHA-256 beside a stronger digest of the impostor
	f.Add([]byte{2, 0, 0, 1, 0, 1, 1, 0, 250, 7, 9, 2}) // 2 0 0 the CA; PKIX-TA; junk
	f.Fuzz(func(t *testing.T, in []byte) {
		var rrs []*dns.TLSA
		for len(in) >= 4 && len(rrs) < 8 {
			u, s, m, kind := pick(in[0], 4), pick(in[1], 2), pick(in[2], 3), in[3]%4
			in = in[4:]
			var data string
			switch kind {
			case 0:
				data = testpki.TLSA(leaf.Leaf, u, s, m)
			case 1:
				data = testpki.TLSA(ca.Cert, u, s, m)
			case 3:
				data = testpki.TLSA(impostor.Leaf, u, s, m)
			default:
				n := 0
				if len(in) > 0 {
					n, in = min(int(in[0]), len(in)-1), in[1:]
				}
				data = fmt.Sprintf("%d %d %d %x", u, s, m, in[:n])
				if n%7 == 3 {
					data += "z" // not hex
				}
				in = in[n:]
			}
			fields := strings.Fields(data)
			hexData := ""
			if len(fields) == 4 {
				hexData = fields[3]
			}
			rrs = append(rrs, &dns.TLSA{Usage: u, Selector: s, MatchingType: m, Certificate: hexData})
		}
		recs := Records(rrs)
		if len(recs) != len(rrs) {
			t.Fatalf("Records: %d records for %d", len(recs), len(rrs))
		}
		usable := 0
		for i, r := range recs {
			if r.Usable != (r.Why == "") {
				t.Fatalf("record %d %v: Usable %v with reason %q", i, r, r.Usable, r.Why)
			}
			if !r.Usable {
				continue
			}
			usable++
			want := map[uint8]int{MatchFull: -1, MatchSHA256: 32, MatchSHA512: 64}
			n, ok := want[r.Matching]
			if r.Usage != UsageDANETA && r.Usage != UsageDANEEE || r.Selector > SelectorSPKI || !ok ||
				n >= 0 && len(r.Data) != n || n < 0 && len(r.Data) == 0 {
				t.Fatalf("record %d %v is usable", i, r)
			}
			for _, o := range recs {
				if o.Usable && o.Usage == r.Usage && o.Selector == r.Selector && r.Matching != MatchFull && o.Matching > r.Matching {
					t.Fatalf("%v usable beside the stronger %v (RFC 7671 §9)", r, o)
				}
			}
		}
		a := NewAuthenticator(recs, names)
		if (a == nil) != (usable == 0) {
			t.Fatalf("NewAuthenticator = %v with %d usable records", a, usable)
		}
		if a == nil {
			return
		}
		for _, c := range []struct {
			name  string
			chain []*x509.Certificate
		}{{"the domain's chain", chain}, {"the impostor's chain", fake}} {
			pass := a.Authenticate(c.chain, now) == nil
			if want := matchesChain(recs, c.chain); pass != want {
				t.Fatalf("%s: Authenticate passes = %v, want %v, with %v", c.name, pass, want, recs)
			}
		}
	})
}

// pick is b as one of n valid values most of the time, and as itself
// (usually invalid) otherwise.
func pick(b byte, n int) uint8 {
	if b >= 200 {
		return b
	}
	return b % uint8(n)
}

// matchesChain says whether a usable record matches the chain's leaf, or,
// as DANE-TA, the certificate that issued it.
func matchesChain(recs []Record, chain []*x509.Certificate) bool {
	for _, r := range recs {
		if !r.Usable {
			continue
		}
		got := hex.EncodeToString(r.Data)
		if strings.HasSuffix(testpki.TLSA(chain[0], r.Usage, r.Selector, r.Matching), " "+got) {
			return true
		}
		if r.Usage == UsageDANETA && strings.HasSuffix(testpki.TLSA(chain[1], r.Usage, r.Selector, r.Matching), " "+got) {
			return true
		}
	}
	return false
}
