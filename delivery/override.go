package delivery

import (
	"github.com/stsrelay/stsrelay/policy"
)

// Override is one [[delivery.policy]] entry: the TLS that mail to Domains
// gets, like a line of Postfix's smtp_tls_policy_maps. Domains are
// patterns (example.org, .example.org, *) matched, as routes are, against
// the next hop's policy domain: the recipient domain, or the host a route
// names. The most specific entry wins; a route's own tls beats every entry.
//
// An override beats opportunistic TLS and MTA-STS in testing mode, but never
// weakens a DANE requirement or an MTA-STS enforce requirement: for those
// hosts only "none" (an explicit opt-out) or "dane-only" (stronger) apply.
type Override struct {
	// Name names the entry in `stsrelay check`: "delivery.policy[0]".
	Name    string
	Domains []string
	// TLS is SecurityMay, SecurityNone, SecurityEncrypt, SecurityVerify
	// (PKIX, the MX host name as reference identifier) or SecurityDANE
	// ("dane-only": mail defers with 4.7.5 unless TLSA records
	// authenticate the host). Unused when Published.
	TLS policy.Security
	// Published is tls = "dane": the domain's published policies decide,
	// DANE first, exactly as without an entry. The policy source must
	// look up TLSA records for these domains (cmd/stsrelay makes sure of
	// it when [dane] is off).
	Published bool
}

// localLevel is the level a [[delivery.policy]] entry or a route's own
// tls sets.
type localLevel struct {
	policy.Local
	// setting is where the configuration sets the level, as it writes it:
	// `delivery.policy[1] tls = "dane-only"`. It is the policy string of
	// the requirements the level makes, and check shows it.
	setting string
}

// levelName is a level as the configuration writes it: SecurityDANE is
// "dane-only", since "dane" there leaves the domain to DNS.
func levelName(sec policy.Security) string {
	if sec == policy.SecurityDANE {
		return "dane-only"
	}
	return sec.String()
}

// override is a local TLS level ready to apply, with its policy identity.
type override struct {
	sec       policy.Security
	published bool
	id        *policy.Identity
}

// localOverride returns the local level that applies to nh, if any: the
// route's own, else the [[delivery.policy]] entry matching the policy
// domain (or, for an address, the recipient domain).
func (e *Engine) localOverride(nh NextHop) (override, bool) {
	domain := nh.PolicyDomain
	if domain == "" {
		domain = nh.Domain
	}
	l := nh.local
	if l == nil {
		entry, _, ok := e.tables.Load().overrides.Lookup(domain, "")
		if !ok {
			return override{}, false
		}
		l = &entry
	}
	return override{sec: l.Security, published: l.Published,
		id: policy.NewIdentity(policy.TypeLocal, domain, []string{l.setting}, nil)}, true
}

// apply returns the requirement for mx once the local override has been
// applied over the published requirement req.
func (o override) apply(req policy.Requirement, mx policy.MX) policy.Requirement {
	if o.published {
		return req
	}
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
	if o.sec == policy.SecurityDANE {
		// dane-only: TLSA records must authenticate the host. The DANE
		// requirement stands as published (a failed TLSA lookup keeps its
		// Skip); records that are all unusable, or no DANE at all, leave
		// nothing to authenticate with, so the host defers.
		if req.Source() != policy.TypeTLSA {
			return local
		}
		if req.Skip == "" && req.DANE == nil {
			req.Security = policy.SecurityDANE
		}
		return req
	}
	if !req.Enforced() {
		return local
	}
	// Never weaken what the domain published.
	return req
}
