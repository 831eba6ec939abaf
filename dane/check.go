package dane

import (
	"crypto/x509"
	"fmt"
	"time"

	"github.com/stsrelay/stsrelay/policy"
)

// Verification is a live certificate chain checked against a host's TLSA
// records, for `stsrelay check`.
type Verification struct {
	// Matches holds, for each of Host.Records in order, the index in the
	// chain of the certificate the record matches, or -1.
	Matches []int
	// Failure is nil when the chain passes as delivery checks it.
	Failure *policy.Failure
	// Advice are lines that tell the domain's operator what to fix.
	Advice []string
}

// Verify checks chain, as the server sent it, against h's TLSA records as
// delivery would, and says what to fix when it fails.
func (h *Host) Verify(chain []*x509.Certificate, now time.Time) *Verification {
	v := &Verification{Matches: make([]int, len(h.Records))}
	m := newMatcher()
	for i, r := range h.Records {
		v.Matches[i] = -1
		for j, c := range chain {
			if m.matches(c, r) {
				v.Matches[i] = j
				break
			}
		}
	}
	if h.Base == "" || h.Requirement.Excluded() {
		return v
	}
	owner := h.owner(h.Base) + "."
	a, ok := h.Requirement.DANE.(*Authenticator)
	if !ok || a == nil {
		v.Advice = append(v.Advice, fmt.Sprintf("no TLSA record at %s is usable for SMTP, so mail goes over TLS without authentication; "+
			"publish DANE-EE(3) or DANE-TA(2) records (RFC 7672 §3.1.3)", owner))
		return v
	}
	v.Failure = a.Authenticate(chain, now)
	if v.Failure == nil || len(chain) == 0 {
		return v
	}
	usableMatch := false
	for i, r := range h.Records {
		usableMatch = usableMatch || (r.Usable && v.Matches[i] >= 0)
	}
	if !usableMatch {
		v.Advice = append(v.Advice, fmt.Sprintf("the TLSA records at %s match none of the certificates the server sends: mail to this host waits; "+
			"if the certificate is the right one, publish %s IN TLSA %s", owner, owner, fmt.Sprintf("3 1 1 %x", association(chain[0], SelectorSPKI, MatchSHA256))))
	}
	if len(a.ta) > 0 && len(a.taCerts) == 0 && len(chain) == 1 {
		v.Advice = append(v.Advice, "DANE-TA(2) records need the server to send its chain up to the trust anchor "+
			"(RFC 7671 §5.2.2); it sends only its own certificate")
	}
	return v
}
