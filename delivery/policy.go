package delivery

import (
	"context"
	"time"
)

// Security is the TLS that a connection to one MX host must have.
type Security int

const (
	// SecurityMay is opportunistic TLS: STARTTLS when offered, any
	// certificate, plaintext when STARTTLS is not offered (RFC 3207).
	SecurityMay Security = iota
	// SecurityNone never starts TLS (a local override says so).
	SecurityNone
	// SecurityEncrypt requires TLS but accepts any certificate.
	SecurityEncrypt
	// SecurityVerify requires TLS with a PKIX-valid certificate whose SAN
	// dNSName matches one of Requirement.Names (RFC 8461 §4.2).
	SecurityVerify
	// SecurityDANE requires TLS authenticated by TLSA records (RFC 7672).
	// Decided by the dane package, next round.
	SecurityDANE
)

func (s Security) String() string {
	switch s {
	case SecurityMay:
		return "may"
	case SecurityNone:
		return "none"
	case SecurityEncrypt:
		return "encrypt"
	case SecurityVerify:
		return "verify"
	case SecurityDANE:
		return "dane"
	}
	return "unknown"
}

// RequiresTLS reports whether a connection without TLS is not allowed.
func (s Security) RequiresTLS() bool { return s >= SecurityEncrypt }

// Source names who asked for a requirement, for logs, deferral texts and TLSRPT.
type Source string

const (
	SourceOpportunistic Source = ""        // nobody: opportunistic TLS
	SourceLocal         Source = "local"   // a [[delivery.policy]] override
	SourceSTS           Source = "mta-sts" // the domain's MTA-STS policy
	SourceDANE          Source = "dane"    // TLSA records in a DNSSEC-secure zone
)

// MX is one host of a route, as the policy step sees it.
type MX struct {
	// Name is the MX record's own target. MTA-STS matches this name
	// against the policy and the certificate (RFC 8461 §4.1, §4.2).
	Name string
	// Final is the name after following CNAMEs; equal to Name when the
	// target is not an alias.
	Final string
	// CNAMEs is the chain of aliases from Name to Final, in order, not
	// counting Name itself. DANE needs it (RFC 7672 §2.2.3).
	CNAMEs     []string
	Preference uint16
	// MXSecure says the MX answer (for an implicit MX, the answer that
	// there is none) was DNSSEC-validated; AddrSecure says the same of
	// the address lookup, CNAMEs included (RFC 7672 §2.2.1, §2.2.2).
	MXSecure, AddrSecure bool
}

// Requirement is what one MX host needs before a message may go to it. It is
// decided before dialing and never relaxed by what happens during the session.
type Requirement struct {
	Security Security
	Source   Source
	// ServerName is the SNI to send; "" means the MX host name.
	ServerName string
	// Names are the reference identifiers a certificate may match under
	// SecurityVerify (and DANE-TA next round).
	Names []string
	// Skip, when not empty, says why this MX fails the policy (for example
	// "not listed in the MTA-STS policy"). Such a host is treated as
	// temporarily unreachable (RFC 8461 §8.4), unless Testing is set: then
	// the failure is recorded and the host is used as SecurityMay would.
	Skip string
	// SkipResult is the RFC 8460 §4.3 result type recorded for a Skip;
	// "" means "validation-failure". DANE uses "tlsa-invalid" or
	// "dnssec-invalid" here.
	SkipResult string
	// Testing is MTA-STS mode "testing": verify as Security says, report
	// what fails, but deliver as SecurityMay would (RFC 8461 §5).
	Testing bool
	// MXValidated says the MX name itself is authenticated (by DNSSEC or by
	// an MTA-STS policy), as REQUIRETLS demands (RFC 8689 §4.2.1).
	MXValidated bool
}

// PolicySource decides the TLS requirement of each MX host of a domain. The
// delivery engine asks it once per attempt, before dialing; MTA-STS and DANE
// implement it, and Chain puts them in order (DESIGN.md decision 3).
type PolicySource interface {
	// Requirements returns one Requirement per mx, in the same order. An
	// error defers the whole attempt; a *Error keeps its status.
	Requirements(ctx context.Context, domain string, mxs []MX) ([]Requirement, error)
}

// SessionResult is one TLS session attempt with one MX host, or one failure
// to get a policy, as TLSRPT counts them (RFC 8460 §4.3).
type SessionResult struct {
	Time         time.Time
	PolicyDomain string
	Source       Source // which policy applied; "" = no policy found
	MX           string // receiving-mx-hostname
	RemoteIP     string // receiving-ip
	HELO         string // receiving-mx-helo, from the greeting
	// ResultType is "" for a successful session, otherwise an RFC 8460
	// §4.3 result type such as "starttls-not-supported" or
	// "certificate-host-mismatch".
	ResultType string
	Detail     string // additional-information, one line
}

// Recorder receives every SessionResult. TLSRPT implements it next round.
type Recorder interface {
	Record(SessionResult)
}
