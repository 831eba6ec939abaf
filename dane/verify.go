package dane

import (
	"bytes"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"errors"
	"strings"
	"time"

	"github.com/stsrelay/stsrelay/policy"
)

// Authenticator checks a server's certificate chain against the usable
// records of one TLSA RRset (policy.Authenticator).
type Authenticator struct {
	ee, ta []Record
	// taCerts are the trust anchors that DANE-TA "2 0 0" records carry
	// whole, usable even when the server does not send them.
	taCerts []*x509.Certificate
	// names are the reference identifiers a DANE-TA chain's leaf must
	// match (RFC 7672 §3.2.2).
	names []string
}

// NewAuthenticator returns an Authenticator for the usable records among
// recs, or nil when none is usable. names are the reference identifiers
// for DANE-TA: the TLSA base domain, the MX host name, the next-hop domain.
func NewAuthenticator(recs []Record, names []string) *Authenticator {
	a := &Authenticator{names: names}
	for _, r := range recs {
		if !r.Usable {
			continue
		}
		switch r.Usage {
		case UsageDANEEE:
			a.ee = append(a.ee, r)
		case UsageDANETA:
			a.ta = append(a.ta, r)
			if r.Selector == SelectorCert && r.Matching == MatchFull {
				if c, err := x509.ParseCertificate(r.Data); err == nil {
					a.taCerts = append(a.taCerts, c)
				}
			}
		}
	}
	if len(a.ee)+len(a.ta) == 0 {
		return nil
	}
	return a
}

var _ policy.Authenticator = (*Authenticator)(nil)

// Authenticate implements policy.Authenticator: chain, leaf first, as the
// server sent it, passes when a DANE-EE record matches the leaf or a DANE-TA
// record matches a trust anchor that the leaf chains to.
func (a *Authenticator) Authenticate(chain []*x509.Certificate, now time.Time) *policy.Failure {
	if len(chain) == 0 {
		return &policy.Failure{Result: policy.ResultCertificateNotTrusted, Reason: "no certificate"}
	}
	m := newMatcher()
	// RFC 7672 §3.1.1, §3.2.1: DANE-EE binds the key alone; no name
	// checks, and the certificate's dates are ignored.
	for _, r := range a.ee {
		if m.matches(chain[0], r) {
			return nil
		}
	}
	var fail *policy.Failure
	for _, ta := range a.anchors(chain, m) {
		f := a.verifyTA(chain, ta, now)
		if f == nil {
			return nil
		}
		if fail == nil || fail.Result == policy.ResultCertificateNotTrusted {
			fail = f
		}
	}
	if fail != nil {
		return fail
	}
	return &policy.Failure{Result: policy.ResultCertificateNotTrusted, Reason: "TLSA records did not match the certificate"}
}

// anchors returns the certificates that a DANE-TA record matches: those
// the server sent, and those the records carry whole.
func (a *Authenticator) anchors(chain []*x509.Certificate, m *matcher) []*x509.Certificate {
	var out []*x509.Certificate
	for _, c := range chain {
		for _, r := range a.ta {
			if m.matches(c, r) {
				out = append(out, c)
				break
			}
		}
	}
	return append(out, a.taCerts...)
}

// verifyTA checks that the leaf chains to ta and names one of a.names
// (RFC 7672 §3.1.2, §3.2.2).
func (a *Authenticator) verifyTA(chain []*x509.Certificate, ta *x509.Certificate, now time.Time) *policy.Failure {
	roots := x509.NewCertPool()
	roots.AddCert(ta)
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		CurrentTime:   now,
		// The trust anchor is the domain's choice, not a Web PKI CA:
		// no extended key usage is demanded of it.
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		var inv x509.CertificateInvalidError
		if errors.As(err, &inv) && inv.Reason == x509.Expired {
			return &policy.Failure{Result: policy.ResultCertificateExpired, Reason: "certificate expired (DANE-TA chain)"}
		}
		return &policy.Failure{Result: policy.ResultCertificateNotTrusted,
			Reason: "certificate does not chain to the DANE-TA trust anchor: " + oneLine(err.Error())}
	}
	if !matchesName(chain[0], a.names) {
		return &policy.Failure{Result: policy.ResultCertificateHostMismatch,
			Reason: "certificate name mismatch (DANE-TA; want " + strings.Join(a.names, " or ") + ")"}
	}
	return nil
}

// matchesName applies RFC 7672 §3.2.3: the DNS-IDs (subjectAltName
// dNSName) when there are any, else the subject CN; a wildcard only as
// the whole left-most label.
func matchesName(cert *x509.Certificate, names []string) bool {
	ids := cert.DNSNames
	if len(ids) == 0 && cert.Subject.CommonName != "" {
		ids = []string{cert.Subject.CommonName}
	}
	for _, n := range names {
		n = strings.ToLower(strings.TrimSuffix(n, "."))
		for _, id := range ids {
			if matchID(strings.ToLower(strings.TrimSuffix(id, ".")), n) {
				return true
			}
		}
	}
	return false
}

func matchID(id, name string) bool {
	if id == name {
		return true
	}
	rest, ok := strings.CutPrefix(id, "*.")
	if !ok || rest == "" || strings.Contains(rest, "*") {
		return false
	}
	// "*.example.com" matches "mx.example.com", not "a.mx.example.com" or
	// "example.com".
	first, after, found := strings.Cut(name, ".")
	return found && first != "" && after == rest
}

// matcher computes each certificate's selector and digest once per
// Authenticate, however many records there are.
type matcher struct {
	cache map[matchKey][]byte
}

type matchKey struct {
	cert              *x509.Certificate
	selector, matches uint8
}

func newMatcher() *matcher { return &matcher{cache: map[matchKey][]byte{}} }

func (m *matcher) matches(c *x509.Certificate, r Record) bool {
	k := matchKey{c, r.Selector, r.Matching}
	v, ok := m.cache[k]
	if !ok {
		v = association(c, r.Selector, r.Matching)
		m.cache[k] = v
	}
	return v != nil && bytes.Equal(v, r.Data)
}

// association is what a TLSA record of this selector and matching type
// holds for c (RFC 6698 §2.1.2, §2.1.3); nil for unknown values.
func association(c *x509.Certificate, selector, matching uint8) []byte {
	var data []byte
	switch selector {
	case SelectorCert:
		data = c.Raw
	case SelectorSPKI:
		data = c.RawSubjectPublicKeyInfo
	default:
		return nil
	}
	switch matching {
	case MatchFull:
		return data
	case MatchSHA256:
		h := sha256.Sum256(data)
		return h[:]
	case MatchSHA512:
		h := sha512.Sum512(data)
		return h[:]
	}
	return nil
}

// oneLine keeps an error readable in a log line and a DSN.
func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 200 {
		s = s[:200] + "..." // ASCII: it ends up in statuses and DSNs
	}
	return s
}
