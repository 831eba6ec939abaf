// Package dane implements DANE for SMTP (RFC 7672, with RFC 7671's updates
// to RFC 6698): per MX host, it finds the DNSSEC-validated TLSA records
// (CNAME rules of RFC 7672 §2.2.2) and authenticates the server's
// certificate against them. It is a policy.PolicySource for delivery.
package dane

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/resolve"
)

// Options configure a Source.
type Options struct {
	// Resolver must be a validating resolver's client: its AD bit is what
	// makes an answer DNSSEC-secure (docs/DESIGN.md, "DNSSEC comes from a validating resolver").
	Resolver *resolve.Resolver
	// Only, when not nil, limits DANE to the next-hop domains (lower
	// case, no trailing dot) for which it returns true: [dane] is off,
	// but [[delivery.policy]] entries ask for DANE.
	Only func(domain string) bool
	// Logger gets a debug line per MX host; nil discards.
	Logger *slog.Logger
}

// Source decides, per MX host, what the domain's TLSA records demand
// (policy.PolicySource).
type Source struct {
	res  *resolve.Resolver
	only func(string) bool
	log  *slog.Logger
}

// New returns a Source.
func New(opts Options) (*Source, error) {
	if opts.Resolver == nil {
		return nil, errors.New("dane: a resolver is required")
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Source{res: opts.Resolver, only: opts.Only, log: log}, nil
}

var _ policy.PolicySource = (*Source)(nil)

// Requirements implements policy.PolicySource. A host without DANE gets a
// requirement with no policy, so the next source in the chain decides. A
// failed TLSA lookup in a secure zone is that host's Skip, never an error
// for the domain (RFC 7672 §2.1.2).
func (s *Source) Requirements(ctx context.Context, domain string, mxs []policy.MX) ([]policy.Requirement, error) {
	out := make([]policy.Requirement, len(mxs))
	if !s.Applies(domain) {
		return out, nil
	}
	// The steps of a lookup are for check and this debug line; most
	// destinations have no DANE, and delivery asks on every attempt.
	debug := s.log.Enabled(ctx, slog.LevelDebug)
	for i, mx := range mxs {
		h := Host{explain: debug}
		s.lookup(ctx, domain, mx, &h)
		if err := ctx.Err(); err != nil {
			// Interrupted: the attempt ends anyway, and a host must not
			// look as if its zone failed.
			return nil, err
		}
		out[i] = h.Requirement
		if debug {
			s.log.Debug("DANE lookup", "domain", domain, "mx", mx.Name, "base", h.Base, "policy", h.Requirement.Label(), "note", h.Note)
		}
	}
	return out, nil
}

// Applies reports whether DANE is looked up for domain (Options.Only).
func (s *Source) Applies(domain string) bool {
	return s.only == nil || s.only(strings.TrimSuffix(strings.ToLower(domain), "."))
}

// Host is what DANE found for one MX host, step by step, as `stsrelay
// check` shows it.
type Host struct {
	MX policy.MX
	// Steps are the DNS answers that decided, in order, with their DNSSEC
	// status.
	Steps []Step
	// Candidates are the TLSA base names in the order they are tried
	// (RFC 7672 §2.2.3); none when DANE does not apply.
	Candidates []string
	// Base is the TLSA base domain in use, also the SNI (§8.1); "" when
	// no candidate had secure TLSA records.
	Base string
	// Records is the TLSA RRset at Base, with each record's usability.
	Records []Record
	// Requirement is what delivery enforces for this host.
	Requirement policy.Requirement
	// Note says in one line why DANE does not apply, or what it demands.
	Note string

	// explain says Steps and Note are wanted (Lookup); Requirements
	// leaves them out unless it logs them.
	explain bool
}

// Step is one DNS answer.
type Step struct {
	Query  string // "TLSA _25._tcp.mx.example.com"
	Secure bool
	Answer string // "2 records", "NODATA", "NXDOMAIN", "SERVFAIL"
}

// owner is where the TLSA records of base are: _port._tcp.base, the port
// delivery dials (RFC 7672 §2.2.3; a route's port, RFC 7672 §3).
func (h *Host) owner(base string) string {
	port := h.MX.Port
	if port == 0 {
		port = 25
	}
	return "_" + strconv.Itoa(int(port)) + "._tcp." + base
}

func (h *Host) step(query string, secure bool, answer string) {
	if h.explain {
		h.Steps = append(h.Steps, Step{Query: query, Secure: secure, Answer: answer})
	}
}

// Lookup finds what DANE demands of mx, a host of domain whose MX and
// address lookups delivery has made (A/AAAA come before TLSA, §2.2.2).
func (s *Source) Lookup(ctx context.Context, domain string, mx policy.MX) *Host {
	h := &Host{explain: true}
	s.lookup(ctx, domain, mx, h)
	return h
}

// lookup is Lookup into h, whose explain field is set.
func (s *Source) lookup(ctx context.Context, domain string, mx policy.MX, h *Host) {
	h.MX = mx
	domain = strings.TrimSuffix(strings.ToLower(domain), ".")
	if h.explain {
		h.step("MX "+domain, mx.MXSecure, "")
		addr := "A/AAAA " + mx.Name
		if len(mx.CNAMEs) > 0 {
			addr += " via CNAME " + strings.Join(mx.CNAMEs, " → ")
		}
		h.step(addr, mx.AddrSecure, "")
	}

	if !mx.MXSecure {
		// RFC 7672 §2.2.1 allows DANE even then; we do not: whoever can
		// forge the MX RRset chooses the host, and its TLSA records with
		// it, so DANE would prove nothing about the domain's choice.
		h.Note = "MX records not DNSSEC-validated: DANE does not apply (RFC 7672 §2.2.1)"
		return
	}
	switch {
	case mx.AddrSecure && len(mx.CNAMEs) > 0:
		// §2.2.2: a secure chain: the expanded name first, then the
		// original; never the names in between.
		h.Candidates = []string{mx.Final, mx.Name}
	case mx.AddrSecure:
		h.Candidates = []string{mx.Name}
	case len(mx.CNAMEs) > 0:
		// §2.2.2: when the chain ends insecure, the original name is
		// still a candidate if the first CNAME is secure. The CNAME
		// query is answered from the resolver's cache, filled by the
		// address lookup. If it fails nonetheless, the answer to the
		// address lookup says whether the alias's zone is signed: if
		// not, its servers may simply be broken, which must not stop
		// mail, so DANE does not apply; if so, the failure is one in a
		// signed zone, which must not turn DANE off (§2.1.1).
		res, err := s.res.Lookup(ctx, mx.Name, dns.TypeCNAME)
		if err != nil && mx.AliasSigned {
			h.step("CNAME "+mx.Name, false, answerOf(err))
			h.Base = mx.Name
			h.Requirement = policy.Requirement{
				Security:    policy.SecurityDANE,
				Policy:      policy.NewIdentity(policy.TypeTLSA, domain, nil, nil),
				ServerName:  mx.Name,
				Skip:        fmt.Sprintf("CNAME lookup for %s failed in its signed zone: %s", mx.Name, answerOf(err)),
				SkipResult:  lookupResult(err),
				MXValidated: true,
			}
			h.Note = h.Requirement.Skip
			return
		}
		if err != nil {
			h.step("CNAME "+mx.Name, false, answerOf(err))
			h.Note = "CNAME lookup failed (" + answerOf(err) + ") in an unsigned zone: DANE does not apply"
			return
		}
		h.step("CNAME "+mx.Name, res.Secure, records(len(res.Records)))
		if !res.Secure || len(res.Records) == 0 {
			h.Note = "CNAME of the MX host not DNSSEC-validated: DANE does not apply (RFC 7672 §2.2.2)"
			return
		}
		h.Candidates = []string{mx.Name}
	default:
		h.Note = "addresses of the MX host not DNSSEC-validated: DANE does not apply (RFC 7672 §2.2.2)"
		return
	}

	for _, base := range h.Candidates {
		owner := h.owner(base)
		rrs, res, err := s.res.TLSA(ctx, owner)
		if resolve.IsNotFound(err) {
			h.step("TLSA "+owner, false, "NXDOMAIN")
			continue
		}
		if err != nil {
			// §2.1.2, §2.2: a TLSA lookup failure in a secure zone makes
			// the host unusable; falling through to the next candidate
			// would let an attacker choose it.
			h.step("TLSA "+owner, false, answerOf(err))
			h.Base = base
			h.Requirement = policy.Requirement{
				Security:    policy.SecurityDANE,
				Policy:      policy.NewIdentity(policy.TypeTLSA, domain, nil, nil),
				ServerName:  base,
				Skip:        fmt.Sprintf("TLSA lookup for %s failed: %s", owner, answerOf(err)),
				SkipResult:  lookupResult(err),
				MXValidated: true,
			}
			h.Note = h.Requirement.Skip
			return
		}
		h.step("TLSA "+owner, res.Secure, records(len(rrs)))
		if !res.Secure || len(rrs) == 0 {
			continue // §2.2.3: insecure or no records: the next candidate
		}
		h.Base = base
		h.Records = Records(rrs)
		h.Requirement, h.Note = requirement(domain, mx, base, h.Records)
		return
	}
	if h.explain {
		h.Note = "no DNSSEC-validated TLSA records at " + strings.Join(h.Candidates, " or ") + ": DANE does not apply"
	}
}

// requirement is what a secure TLSA RRset at base demands (RFC 7672 §2.2).
func requirement(domain string, mx policy.MX, base string, recs []Record) (policy.Requirement, string) {
	strs := make([]string, len(recs))
	for i, r := range recs {
		strs[i] = r.String()
	}
	req := policy.Requirement{
		Policy:      policy.NewIdentity(policy.TypeTLSA, domain, strs, nil),
		ServerName:  base, // §8.1
		MXValidated: true,
	}
	// §3.2.2: the reference identifiers of a DANE-TA chain.
	names := []string{base}
	for _, n := range []string{mx.Name, domain} {
		if n != "" && !slices.Contains(names, n) {
			names = append(names, n)
		}
	}
	a := NewAuthenticator(recs, names)
	if a == nil {
		// §2.2: records exist, none usable: TLS without authentication,
		// and never plaintext (§2.2.3).
		req.Security = policy.SecurityEncrypt
		return req, fmt.Sprintf("%d TLSA records at %s, none usable: TLS required, no authentication", len(recs), base)
	}
	req.Security, req.DANE, req.Names = policy.SecurityDANE, a, names
	return req, fmt.Sprintf("TLSA records at %s: TLS authenticated by DANE required", base)
}

// lookupResult is the RFC 8460 §4.3.2 result type of a failed TLSA lookup:
// broken data is tlsa-invalid; a resolver that returns no valid answer
// (SERVFAIL, the way a validator says "bogus", or silence) dnssec-invalid.
func lookupResult(err error) policy.ResultType {
	if errors.Is(err, resolve.ErrCNAMEChain) {
		return policy.ResultTLSAInvalid
	}
	return policy.ResultDNSSECInvalid
}

// answerOf is a failed lookup in a word or two: "SERVFAIL", "timeout".
func answerOf(err error) string {
	var re *resolve.Error
	if errors.As(err, &re) {
		switch {
		case re.NotFound:
			return "NXDOMAIN"
		case re.Err != nil:
			return re.Err.Error()
		case re.Rcode >= 0:
			return dns.RcodeToString[re.Rcode]
		}
	}
	return err.Error()
}

func records(n int) string {
	switch n {
	case 0:
		return "NODATA"
	case 1:
		return "1 record"
	}
	return fmt.Sprintf("%d records", n)
}
