package policy

import (
	"crypto/x509"
	"strconv"
	"strings"
	"time"
)

// Type is the kind of policy a requirement comes from. The first three are
// RFC 8460 §4.4's policy-type values; TypeLocal is an operator's own policy.
type Type string

const (
	TypeNone  Type = "no-policy-found" // opportunistic TLS: nobody asked for more
	TypeSTS   Type = "sts"             // the domain's MTA-STS policy (RFC 8461)
	TypeTLSA  Type = "tlsa"            // TLSA records in a DNSSEC-secure zone (RFC 7672)
	TypeLocal Type = "local"           // a [[delivery.policy]] entry
)

// Published reports whether the domain itself asked for the policy in DNS.
func (t Type) Published() bool { return t == TypeSTS || t == TypeTLSA }

// Identity names one policy: what RFC 8460 §4.4 reports group results by,
// and what a reused connection must have been opened under. It is never
// modified after NewIdentity, so requirements share it by pointer.
type Identity struct {
	Type Type
	// Domain is the policy domain: the next-hop domain that published it.
	Domain string
	// Strings is RFC 8460's policy-string: the MTA-STS policy as one
	// "key: value" per line, or each TLSA record as "usage selector
	// matching-type data".
	Strings []string
	// MXHosts is RFC 8460's mx-host: the MTA-STS policy's mx patterns.
	MXHosts []string

	key string
}

// NewIdentity returns the identity of one policy.
func NewIdentity(t Type, domain string, strs, mxHosts []string) *Identity {
	var b strings.Builder
	b.WriteString(string(t))
	b.WriteByte(0)
	b.WriteString(domain)
	for _, s := range [][]string{strs, mxHosts} {
		b.WriteByte(1)
		for _, v := range s {
			b.WriteString(v)
			b.WriteByte(0)
		}
	}
	return &Identity{Type: t, Domain: domain, Strings: strs, MXHosts: mxHosts, key: b.String()}
}

// Key is a string equal for equal policies; "" for no policy.
func (id *Identity) Key() string {
	if id == nil {
		return ""
	}
	return id.key
}

// Authenticator checks a server's certificate chain against something
// other than the Web PKI: the dane package implements it for TLSA records.
type Authenticator interface {
	// Authenticate checks chain, leaf first, as the server sent it.
	Authenticate(chain []*x509.Certificate, now time.Time) *Failure
}

// Requirement is what one MX host needs before a message may go to it. It
// is decided before dialing and never relaxed by what happens during the
// session. Its methods are the one place that says what it demands.
type Requirement struct {
	Security Security
	// Policy is the policy that decided; nil means none did (opportunistic).
	Policy *Identity
	// ServerName is the SNI to send; "" means the MX host name.
	ServerName string
	// Names are the reference identifiers a certificate may match under
	// SecurityVerify.
	Names []string
	// DANE authenticates the server under SecurityDANE; nil there means
	// nothing can, and the host is not used.
	DANE Authenticator
	// Skip, when not empty, says why this MX fails the policy (for example
	// "not listed in the MTA-STS policy"). Such a host is treated as
	// temporarily unreachable (RFC 8461 §8.4), unless Testing is set: then
	// the failure is reported and the host is used as SecurityMay would.
	Skip string
	// SkipResult is the RFC 8460 §4.3 result type reported for a Skip;
	// "" means validation-failure.
	SkipResult ResultType
	// Testing is MTA-STS mode "testing": verify as Security says, report
	// what fails, but deliver as SecurityMay would (RFC 8461 §5).
	Testing bool
	// MXValidated says the MX name itself is authenticated (by DNSSEC or
	// by an MTA-STS policy), as REQUIRETLS demands (RFC 8689 §4.2.1).
	MXValidated bool
	// Unreported leaves this message's sessions out of TLS reports: it is
	// one of our own reports (RFC 8460 §3), or its "TLS-Required: No"
	// set the policy aside (RFC 8689 §5), so its sessions say nothing
	// of how the policy fared.
	Unreported bool
}

// Source is the kind of policy that decided.
func (r Requirement) Source() Type {
	if r.Policy == nil {
		return TypeNone
	}
	return r.Policy.Type
}

// Domain is the policy domain, "" when no policy decided.
func (r Requirement) Domain() string {
	if r.Policy == nil {
		return ""
	}
	return r.Policy.Domain
}

// WantTLS reports whether STARTTLS is to be tried at all.
func (r Requirement) WantTLS() bool { return r.Security != SecurityNone }

// MustTLS reports whether the message must not go without TLS.
func (r Requirement) MustTLS() bool { return r.Security.RequiresTLS() && !r.Testing }

// MustAuthenticate reports whether a certificate that fails the check
// stops delivery through this host.
func (r Requirement) MustAuthenticate() bool { return r.Security.Authenticates() && !r.Testing }

// Excluded reports whether the host must not be used at all.
func (r Requirement) Excluded() bool { return r.Skip != "" && !r.Testing }

// Enforced reports whether a policy the domain published rules this host
// (DANE, or MTA-STS in enforce mode), which a local policy may not weaken.
func (r Requirement) Enforced() bool {
	switch r.Source() {
	case TypeTLSA:
		return true
	case TypeSTS:
		return !r.Testing && (r.Security.RequiresTLS() || r.Skip != "")
	}
	return false
}

// SkipResultType is the RFC 8460 result type of a Skip.
func (r Requirement) SkipResultType() ResultType {
	if r.SkipResult != "" {
		return r.SkipResult
	}
	return ResultValidationFailure
}

// Label names the requirement in logs and metrics: "mta-sts/verify",
// "dane/dane", "local/encrypt", "may"; "/testing" marks MTA-STS testing.
func (r Requirement) Label() string {
	s := r.Security.String()
	switch r.Source() {
	case TypeSTS:
		s = "mta-sts/" + s
	case TypeTLSA:
		s = "dane/" + s
	case TypeLocal:
		s = "local/" + s
	}
	if r.Testing {
		s += "/testing"
	}
	return s
}

// Key is equal for requirements that a connection may serve
// interchangeably: same policy, same demands.
func (r Requirement) Key() string {
	// Built for every delivery attempt: one allocation, sized up front.
	sec := strconv.Itoa(int(r.Security))
	n := len(sec) + len(r.ServerName) + len(r.Policy.Key()) + 3 + 3*len("false") + 1
	for _, name := range r.Names {
		n += len(name) + 1
	}
	var b strings.Builder
	b.Grow(n)
	b.WriteString(sec)
	b.WriteByte('|')
	b.WriteString(r.ServerName)
	b.WriteByte('|')
	for i, name := range r.Names {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(name)
	}
	b.WriteByte('|')
	b.WriteString(strconv.FormatBool(r.Testing))
	b.WriteString(strconv.FormatBool(r.MXValidated))
	b.WriteString(strconv.FormatBool(r.Skip != ""))
	b.WriteByte('|')
	b.WriteString(r.Policy.Key())
	return b.String()
}
