package delivery

import (
	"github.com/stsrelay/stsrelay/policy"
)

// Override is one [[delivery.policy]] entry: the TLS that mail to Domain
// gets, like a line of Postfix's smtp_tls_policy_maps.
//
// An override beats opportunistic TLS and MTA-STS in testing mode, but never
// weakens a DANE requirement or an MTA-STS enforce requirement: for those
// hosts only "none" (an explicit opt-out) or "dane-only" (stronger) apply.
type Override struct {
	Domain string
	// TLS is SecurityMay, SecurityNone, SecurityEncrypt, SecurityVerify
	// (PKIX, the MX host name as reference identifier) or SecurityDANE
	// ("dane-only": mail defers with 4.7.5 unless TLSA records
	// authenticate the host).
	TLS policy.Security
}

// override is an Override ready to apply, with its policy identity made once.
type override struct {
	sec policy.Security
	id  *policy.Identity
}

// apply returns the requirement for mx once the local override has been
// applied over the published requirement req.
func (o override) apply(req policy.Requirement, mx policy.MX) policy.Requirement {
	local := policy.Requirement{
		Security:    o.sec,
		Policy:      o.id,
		Names:       []string{mx.Name},
		MXValidated: req.MXValidated,
	}
	if o.sec == policy.SecurityNone {
		// An explicit "none" is the operator opting out, DNS policy or not.
		return local
	}
	if !req.Enforced() {
		return local
	}
	// Never weaken what the domain published; dane-only is stronger than
	// MTA-STS, and a DANE requirement already is DANE.
	if o.sec == policy.SecurityDANE && req.Source() != policy.TypeTLSA {
		return local
	}
	return req
}
