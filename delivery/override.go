package delivery

import (
	"context"
	"fmt"
	"strings"
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
	// ("dane-only": until the dane package lands, such mail defers with
	// 4.7.5 rather than go out unauthenticated).
	TLS Security
}

// ParseSecurity parses the tls value of a [[delivery.policy]] entry:
// may, none, encrypt, verify or dane-only.
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
	case "dane-only", "dane":
		return SecurityDANE, nil
	}
	return 0, fmt.Errorf("unknown tls level %q (want may, none, encrypt, verify or dane-only)", s)
}

// applyOverride returns the requirement for mx once the local override sec
// has been applied over the published requirement req.
func applyOverride(req Requirement, mx MX, sec Security) Requirement {
	local := Requirement{
		Security:    sec,
		Source:      SourceLocal,
		Names:       []string{mx.Name},
		MXValidated: req.MXValidated,
	}
	if sec == SecurityNone {
		// An explicit "none" is the operator opting out, DNS policy or not.
		return local
	}
	enforced := req.Source == SourceDANE ||
		(req.Source == SourceSTS && !req.Testing && (req.Security.RequiresTLS() || req.Skip != ""))
	if !enforced {
		return local
	}
	// Never weaken what the domain published; dane-only is stronger than
	// MTA-STS, and a DANE requirement already is DANE.
	if sec == SecurityDANE && req.Source != SourceDANE {
		return local
	}
	return req
}

// Chain asks each source in turn and keeps, per MX host, the first
// requirement that is not opportunistic: pass the DANE source first, then
// MTA-STS (DESIGN.md decision 3). The first error ends the lookup.
func Chain(sources ...PolicySource) PolicySource {
	return chain(sources)
}

type chain []PolicySource

func (c chain) Requirements(ctx context.Context, domain string, mxs []MX) ([]Requirement, error) {
	out := make([]Requirement, len(mxs))
	decided := make([]bool, len(mxs))
	validated := make([]bool, len(mxs))
	for _, src := range c {
		if src == nil {
			continue
		}
		reqs, err := src.Requirements(ctx, domain, mxs)
		if err != nil {
			return nil, err
		}
		if len(reqs) != len(mxs) {
			return nil, fmt.Errorf("policy source %T returned %d requirements for %d MX hosts", src, len(reqs), len(mxs))
		}
		for i, r := range reqs {
			// DNSSEC may vouch for the MX name even where DANE does
			// not decide the TLS (RFC 8689 §4.2.1): keep it either way.
			validated[i] = validated[i] || r.MXValidated
			if !decided[i] && r.Source != SourceOpportunistic {
				out[i], decided[i] = r, true
			}
		}
	}
	for i := range out {
		out[i].MXValidated = validated[i]
	}
	return out, nil
}
