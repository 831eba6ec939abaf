package sts

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/resolve"
)

// CheckReport explains how MTA-STS applies to mail for one domain, for
// "stsrelay check". Building it sends no mail.
type CheckReport struct {
	Domain    string
	Discovery *Discovery // nil when DNS failed
	Record    *Record
	RecordErr error
	Policy    *Policy // fetched just now
	FetchErr  error
	MXs       []CheckedMX
	MXErr     error
	// MatchCNAMETarget is this relay's sts.match_cname_target.
	MatchCNAMETarget bool

	// Cached is the running relay's cached policy; the CLI fills it in
	// from the control socket. CachedNote says why it is nil.
	Cached     *PolicyInfo
	CachedNote string
}

// CheckedMX is one MX host of the domain.
type CheckedMX struct {
	Name       string // the MX record's target, no trailing dot
	Preference uint16
	CNAMEs     []string // aliases from Name to Final
	Final      string
	AddrErr    error
}

// Check looks up the TXT record, fetches the policy and lists the MX hosts
// of domain. Failures are part of the report, not errors.
func (m *Manager) Check(ctx context.Context, domain string) *CheckReport {
	r := &CheckReport{Domain: domain, MatchCNAMETarget: m.matchCNAMETarget}
	d, err := policyDomain(domain)
	if err != nil {
		r.RecordErr = err
		return r
	}
	r.Domain = d
	r.Record, r.Discovery, r.RecordErr = LookupRecord(ctx, m.resolver, d)
	r.Policy, r.FetchErr = m.Fetch(ctx, d)
	mxs, _, err := m.resolver.MX(ctx, d)
	if err != nil {
		r.MXErr = err
		return r
	}
	slices.SortStableFunc(mxs, func(a, b *dns.MX) int { return int(a.Preference) - int(b.Preference) })
	for _, rr := range mxs {
		name := strings.TrimSuffix(rr.Mx, ".")
		c := CheckedMX{Name: name, Preference: rr.Preference, Final: name}
		if name != "" {
			_, res, err := m.resolver.Addrs(ctx, name, resolve.IPBoth)
			if err != nil {
				c.AddrErr = err
			} else {
				c.Final = strings.TrimSuffix(res.Final, ".")
				for _, a := range res.CNAMEs {
					c.CNAMEs = append(c.CNAMEs, strings.TrimSuffix(a, "."))
				}
			}
		}
		r.MXs = append(r.MXs, c)
	}
	return r
}

// matchPolicy is the policy MX hosts are checked against: the one fetched
// now, else the relay's cached one.
func (r *CheckReport) matchPolicy() (*Policy, string) {
	if r.Policy != nil {
		return r.Policy, "the fetched policy"
	}
	if r.Cached != nil {
		if p, err := Parse([]byte(r.Cached.Policy)); err == nil {
			return p, "the cached policy"
		}
	}
	return nil, ""
}

// Write prints the report for a person.
func (r *CheckReport) Write(w io.Writer) {
	fmt.Fprintf(w, "MTA-STS check of %s (no mail is sent)\n", r.Domain)

	fmt.Fprintf(w, "\nTXT record _mta-sts.%s:\n", r.Domain)
	if d := r.Discovery; d != nil {
		for _, c := range d.CNAMEs {
			fmt.Fprintf(w, "  CNAME to %s\n", strings.TrimSuffix(c, "."))
		}
		for _, t := range d.STS {
			fmt.Fprintf(w, "  %q\n", t)
		}
		for _, t := range d.Others {
			fmt.Fprintf(w, "  %q (not v=STSv1, ignored)\n", t)
		}
	}
	switch {
	case r.RecordErr == nil:
		fmt.Fprintf(w, "  OK: policy id %s\n", r.Record.ID)
	case errors.Is(r.RecordErr, ErrNoRecord):
		fmt.Fprintf(w, "  none: %s does not publish MTA-STS (RFC 8461 §3.1)\n", r.Domain)
	default:
		fmt.Fprintf(w, "  PROBLEM: %v\n", r.RecordErr)
	}

	fmt.Fprintf(w, "\nPolicy %s:\n", PolicyURL(r.Domain))
	if r.FetchErr != nil {
		var fe *FetchError
		kind := ""
		if errors.As(r.FetchErr, &fe) {
			kind = " [" + string(fe.ResultType) + "]"
		}
		fmt.Fprintf(w, "  PROBLEM%s: %v\n", kind, r.FetchErr)
	} else {
		for _, l := range r.Policy.Lines() {
			fmt.Fprintf(w, "  %s\n", l)
		}
		fmt.Fprintf(w, "  OK: mode %s, cached for %s\n", r.Policy.Mode, r.Policy.MaxAge)
		if r.RecordErr != nil {
			fmt.Fprintln(w, "  note: without a valid TXT record senders never fetch this policy")
		}
	}

	fmt.Fprintln(w, "\nCached policy in the running relay:")
	switch c := r.Cached; {
	case c != nil:
		state := "in force"
		if c.Expired {
			state = "EXPIRED"
		}
		fmt.Fprintf(w, "  id %s, mode %s, mx %s, fetched %s, expires %s (%s)\n", c.ID, c.Mode,
			strings.Join(c.MX, " "), c.Fetched.UTC().Format(time.RFC3339), c.Expires.UTC().Format(time.RFC3339), state)
		if c.LastError != "" {
			fmt.Fprintf(w, "  last fetch failed: %s\n", c.LastError)
		}
	case r.CachedNote != "":
		fmt.Fprintf(w, "  %s\n", r.CachedNote)
	default:
		fmt.Fprintln(w, "  none")
	}

	fmt.Fprintf(w, "\nMX hosts (sts.match_cname_target = %v):\n", r.MatchCNAMETarget)
	if r.MXErr != nil {
		fmt.Fprintf(w, "  PROBLEM: %v\n", r.MXErr)
		return
	}
	if len(r.MXs) == 0 {
		fmt.Fprintf(w, "  none: mail goes to %s itself (implicit MX, RFC 5321 §5.1)\n", r.Domain)
	}
	p, which := r.matchPolicy()
	passing, cnameWarn := 0, false
	for _, mx := range r.MXs {
		fmt.Fprintf(w, "  %d %s\n", mx.Preference, mx.Name)
		if mx.AddrErr != nil {
			fmt.Fprintf(w, "      address lookup: %v\n", mx.AddrErr)
		}
		isCNAME := len(mx.CNAMEs) > 0
		if isCNAME {
			fmt.Fprintf(w, "      is a CNAME: %s\n", strings.Join(append([]string{mx.Name}, mx.CNAMEs...), " -> "))
		}
		if p == nil || p.Mode == ModeNone {
			continue
		}
		byName := p.Match(mx.Name)
		byTarget := isCNAME && p.Match(mx.Final)
		fmt.Fprintf(w, "      MX name %s, as RFC 8461 §4.1 reads: %s\n", mx.Name, verdict(byName))
		if isCNAME {
			fmt.Fprintf(w, "      CNAME target %s, with match_cname_target: %s\n", mx.Final, verdict(byName || byTarget))
		}
		if byName || (r.MatchCNAMETarget && byTarget) {
			passing++
		}
		if isCNAME && byName != byTarget {
			cnameWarn = true
		}
	}
	if cnameWarn {
		fmt.Fprintln(w, "\n  WARNING: an MX target is a CNAME, and the policy matches only one of the")
		fmt.Fprintln(w, "  two names. Senders disagree on which name counts: RFC 8461 §4.1 says the MX")
		fmt.Fprintln(w, "  record's own name, while some large senders match the CNAME target and")
		fmt.Fprintln(w, "  refuse such domains. Point the MX record at the host itself, or list both")
		fmt.Fprintln(w, "  names in the policy.")
	}
	if p == nil {
		fmt.Fprintln(w, "\nVerdict: no MTA-STS policy applies; mail goes with opportunistic TLS.")
		return
	}
	fmt.Fprintf(w, "\nVerdict (checked against %s, mode %s): ", which, p.Mode)
	switch {
	case p.Mode == ModeNone:
		fmt.Fprintln(w, "mode none, mail goes with opportunistic TLS.")
	case passing > 0:
		fmt.Fprintf(w, "%d of %d MX hosts may receive mail, over TLS with a certificate valid for the matched name.\n", passing, len(r.MXs))
	case p.Mode == ModeTesting:
		fmt.Fprintln(w, "no MX host matches; mode testing, so mail is delivered anyway and the failure reported.")
	default:
		fmt.Fprintf(w, "no MX host matches; mail to %s is deferred (451 4.4.8) until the policy or the MX records change.\n", r.Domain)
	}
}

func verdict(ok bool) string {
	if ok {
		return "matches the policy"
	}
	return "NOT in the policy"
}
