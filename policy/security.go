package policy

import (
	"fmt"
	"strings"
)

// Security is the TLS that a connection to one MX host must have.
type Security int

const (
	// SecurityMay is opportunistic TLS: STARTTLS when offered, any
	// certificate, plaintext when STARTTLS is not offered (RFC 3207).
	SecurityMay Security = iota
	// SecurityNone never starts TLS (a local policy says so).
	SecurityNone
	// SecurityEncrypt requires TLS but accepts any certificate.
	SecurityEncrypt
	// SecurityVerify requires TLS with a PKIX-valid certificate whose SAN
	// dNSName matches one of Requirement.Names (RFC 8461 §4.2).
	SecurityVerify
	// SecurityDANE requires TLS authenticated by TLSA records (RFC 7672),
	// through Requirement.DANE.
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

// RequiresTLS reports whether the level forbids a connection without TLS.
func (s Security) RequiresTLS() bool { return s >= SecurityEncrypt }

// Authenticates reports whether the level checks who the server is, not
// only that the channel is encrypted.
func (s Security) Authenticates() bool { return s == SecurityVerify || s == SecurityDANE }

// ParseSecurity parses a tls level as [[delivery.policy]] writes it: may,
// none, encrypt, verify or dane-only. "dane" is not a level (ParseLocal).
func ParseSecurity(s string) (Security, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "may":
		return SecurityMay, nil
	case "none":
		return SecurityNone, nil
	case "encrypt":
		return SecurityEncrypt, nil
	case "verify":
		return SecurityVerify, nil
	case "dane-only":
		return SecurityDANE, nil
	}
	return 0, fmt.Errorf("unknown tls level %q (want may, none, encrypt, verify or dane-only)", s)
}

// Local is what one [[delivery.policy]] entry asks for, as Postfix's
// policy table levels mean it.
type Local struct {
	// Security is the level the entry imposes, unless Published.
	Security Security
	// Published is tls = "dane": DANE where the domain publishes TLSA
	// records, else what its other published policy (MTA-STS) or
	// opportunistic TLS gives; the entry imposes nothing itself.
	Published bool
}

// WantsDANE reports whether the entry needs TLSA lookups for its domain.
func (l Local) WantsDANE() bool { return l.Published || l.Security == SecurityDANE }

// ParseLocal parses a [[delivery.policy]] tls value: may, none, encrypt,
// verify, dane or dane-only.
func ParseLocal(s string) (Local, error) {
	if strings.EqualFold(strings.TrimSpace(s), "dane") {
		return Local{Published: true}, nil
	}
	sec, err := ParseSecurity(s)
	if err != nil {
		return Local{}, fmt.Errorf("unknown tls value %q (want may, none, encrypt, verify, dane or dane-only)", s)
	}
	return Local{Security: sec}, nil
}
