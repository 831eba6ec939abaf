package policy

import (
	"context"
	"fmt"
)

// MX is one host of a route, as a policy source sees it.
type MX struct {
	// Name is the MX record's own target. MTA-STS matches this name
	// against the policy and the certificate (RFC 8461 §4.1, §4.2).
	Name string
	// Final is the name after following CNAMEs; equal to Name when the
	// target is not an alias.
	Final string
	// CNAMEs is the chain of aliases from Name to Final, in order, not
	// counting Name itself (RFC 7672 §2.2.3).
	CNAMEs     []string
	Preference uint16
	// Port is the TCP port delivery dials: 25, or a route's port. DANE
	// looks up TLSA at _port._tcp.<base> (RFC 7672 §2.2.2, §3 for
	// non-MX destinations).
	Port uint16
	// MXSecure says the MX answer (for an implicit MX, the answer that
	// there is none) was DNSSEC-validated; AddrSecure says the same of
	// the address lookup, CNAMEs included (RFC 7672 §2.2.1, §2.2.2).
	MXSecure, AddrSecure bool
	// AliasSigned says Name's own CNAME record came with its RRSIG in
	// the address answer: Name is in a signed zone, whatever the zones
	// its aliases lead to (DANE: a failed CNAME query there is no sign
	// of an unsigned zone).
	AliasSigned bool
}

// PolicySource decides the TLS requirement of each MX host of a domain.
// Delivery asks it once per attempt, before dialing; MTA-STS and DANE
// implement it, and Chain puts them in order.
type PolicySource interface {
	// Requirements returns one Requirement per mx, in the same order. An
	// error defers the whole attempt; an *Error keeps its status.
	Requirements(ctx context.Context, domain string, mxs []MX) ([]Requirement, error)
}

// Error is a failure with the status every recipient of the attempt gets,
// for a source that must stop the whole attempt with its own words.
type Error struct {
	Code     int    // SMTP reply code: 451
	Enhanced string // RFC 3463 enhanced code: "4.7.5"
	Text     string
}

func (e *Error) Error() string { return fmt.Sprintf("%d %s %s", e.Code, e.Enhanced, e.Text) }

// Chain asks each source in turn and keeps, per MX host, the first
// requirement that a policy decided: pass DANE first, then MTA-STS, since
// MTA-STS must never override DANE (RFC 8461 §2). The first error ends the
// lookup.
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
			if !decided[i] && r.Policy != nil {
				out[i], decided[i] = r, true
			}
		}
	}
	for i := range out {
		out[i].MXValidated = validated[i]
	}
	return out, nil
}
