package sts

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/stsrelay/stsrelay/policy"
)

var _ policy.PolicySource = (*Manager)(nil)

// Requirements implements policy.PolicySource: per MX host, what MTA-STS
// demands (RFC 8461 §4, §5).
//
//   - enforce: an MX host that does not match the policy is skipped, which
//     delivery treats as temporarily unreachable (§8.4); one that matches
//     needs TLS with a PKIX certificate for the matched name (§4.2).
//   - testing: the same requirements with Testing set: delivery goes ahead
//     whatever fails (a Skip included) and only reports.
//   - none, or no policy: opportunistic TLS.
//
// RFC 8461 §5.1 forbids failing a message permanently for an enforce failure
// without first checking DNS for an updated policy. This holds because every
// attempt calls Requirements, which looks up the TXT record (from the
// resolver's cache within its TTL) and fetches the policy when its id
// changed, and because delivery defers such failures with the temporary
// 451 4.4.8: a message only fails when the queue's lifetime runs out, after
// many attempts, each of which checked for a new policy.
//
// A domain without a usable policy gets opportunistic requirements. When
// the first fetch of its policy id is slow (RFC 8461 §3.3 gives the policy
// host a minute), the delivery is deferred with a *policy.Error after
// FetchWait rather than holding its worker or going ahead without the
// policy; the fetch goes on, and a later attempt finds the policy cached.
// Once a fetch of that id has failed, a slow fetch is not deferred for:
// with no policy fetched and none cached, the delivery goes ahead as
// without MTA-STS (§5.1), as it would otherwise be deferred until it
// expired. Otherwise the only error is a cancelled ctx.
func (m *Manager) Requirements(ctx context.Context, domain string, mxs []policy.MX) ([]policy.Requirement, error) {
	cp, err := m.policy(ctx, domain, m.fetchWait)
	if errors.Is(err, ErrFetchPending) {
		return nil, &policy.Error{Code: 451, Enhanced: "4.4.3",
			Text: fmt.Sprintf("MTA-STS policy of %s not fetched yet (%v); will retry", domain, err)}
	}
	if err != nil && !errors.Is(err, ErrNoPolicy) {
		return nil, err
	}
	reqs := make([]policy.Requirement, len(mxs))
	if cp == nil || cp.Policy.Mode == ModeNone {
		// RFC 8461 §5: mode none is handled as if there were no policy.
		mode := "no-policy"
		if cp != nil {
			mode = string(ModeNone)
		}
		decisions.WithLabelValues(mode).Inc()
		for i := range reqs {
			reqs[i] = policy.Requirement{Security: policy.SecurityMay}
		}
		return reqs, nil
	}
	decisions.WithLabelValues(string(cp.Policy.Mode)).Inc()
	for i, mx := range mxs {
		reqs[i] = m.requirement(cp, mx)
	}
	return reqs, nil
}

// requirement decides one MX host under an enforce or testing policy.
func (m *Manager) requirement(cp *CachedPolicy, mx policy.MX) policy.Requirement {
	name := strings.TrimSuffix(mx.Name, ".")
	r := policy.Requirement{
		Security: policy.SecurityVerify,
		Policy:   cp.Identity,
		// RFC 8461 §7.1: SNI is the MX host name, also when the
		// CNAME target is what matched.
		ServerName: name,
		Testing:    cp.Policy.Mode == ModeTesting,
	}
	// RFC 8461 §4.1: check the MX record's own target, not a CNAME
	// target; the certificate must then be valid for it (§4.2).
	var matched []string
	if cp.Policy.Match(name) {
		matched = append(matched, name)
	}
	if final := strings.TrimSuffix(mx.Final, "."); m.matchCNAMETarget && final != "" &&
		!strings.EqualFold(final, name) && cp.Policy.Match(final) {
		// sts.match_cname_target (docs/DESIGN.md, "MX names and CNAMEs"): the policy
		// lists the provider's host that the MX name is an alias of; a
		// certificate for either listed name is accepted.
		matched = append(matched, final)
	}
	if len(matched) == 0 {
		// Enforce: the host must not be used (§4.1), and counts as
		// temporarily unreachable (§8.4). Testing: delivery reports the
		// Skip reason and goes ahead anyway (§5); the certificate is
		// still checked against the MX name, for the report.
		r.Names = []string{name}
		r.Skip = "not listed in the MTA-STS policy for " + cp.Domain
		return r
	}
	r.Names = matched
	// RFC 8689 §4.2.1: a host matching an MTA-STS policy counts as a
	// validated MX for REQUIRETLS.
	r.MXValidated = true
	return r
}
