package delivery

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/netip"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
)

// plan is a route with each host's requirement: everything delivery
// decides before it dials.
type plan struct {
	nh   NextHop
	hops []hop
	reqs []policy.Requirement
	// locals are the operator's level for each host (a route's tls, a
	// [[delivery.policy]]) as it reads without any published policy;
	// nil without a local setting, or with one that defers to what is
	// published. A message that waives published policies keeps it.
	locals   []policy.Requirement
	implicit bool
	// status, when set, is what every recipient gets without a connection.
	status *queue.Status
}

// plan routes nh and asks the policy sources about its hosts. Delivery
// and Check both start here, so what check shows is what delivery does.
func (e *Engine) plan(ctx context.Context, nh NextHop) plan {
	p := plan{nh: nh}
	p.hops, p.implicit, p.status = e.route(ctx, nh)
	if p.status != nil {
		return p
	}
	p.reqs, p.locals, p.status = e.requirements(ctx, nh, p.hops)
	return p
}

// effective is the requirement one message gets at hops[i].
func (p *plan) effective(i int, env queue.Envelope) policy.Requirement {
	req := p.reqs[i]
	if env.NoTLSPolicy && !env.RequireTLS && req.Source().Published() {
		// RFC 8689 §5: "TLS-Required: No" means the recipient's MTA-STS
		// and DANE are not enforced for this message; STARTTLS is still
		// tried. The operator's own level is no recipient policy and
		// stands: a route's verify guards its password, whatever the
		// smart host's domain published.
		switch {
		case p.locals == nil:
			req.Security, req.Skip, req.Testing = policy.SecurityMay, "", false
		case p.locals[i].Security == policy.SecurityDANE:
			// dane-only: the operator asked for DANE, which the
			// published TLSA records already give.
		default:
			req = p.locals[i]
		}
		req.Unreported = true
	}
	req.Unreported = req.Unreported || env.TLSReport
	return req
}

// anySender matches no sender pattern: Check without a sender shows the
// route that every sender gets unless a sender-dependent route applies.
const anySender = "\x00"

// Report is what a delivery to one domain would do now, for
// "stsrelay check": the route, each host's requirement and, when Check
// connects, what each host's TLS showed. Building it sends no mail.
type Report struct {
	Domain string
	// NextHop is where the routes send the domain's mail: its Route (""
	// for the domain's own MX hosts), the host and port, and the
	// PolicyDomain whose MTA-STS policy applies.
	NextHop NextHop
	// Implicit says the domain has no MX records, so the domain itself is
	// the host (RFC 5321 §5.1).
	Implicit bool
	// Status, when set, is what every recipient gets without any
	// connection: null MX, a domain that does not exist, a DNS failure.
	Status *queue.Status
	Hosts  []HostReport
	// Connected says Check dialed the hosts.
	Connected bool
	// Outcome is what a message (without REQUIRETLS) would get now:
	// 250 with Via set when a host would take it, else the status every
	// recipient would get. Its Code is 0 when only dialing can tell.
	Outcome queue.Status
	Via     string
}

// HostReport is one host of the route.
type HostReport struct {
	MX          policy.MX
	Addrs       []netip.Addr
	Requirement policy.Requirement
	// NotUsed, when set, is why delivery does not dial this host: its
	// address lookup failed, or its requirement rules it out.
	NotUsed *queue.Status
	// Failures are the addresses that were dialed and failed, in order.
	Failures []queue.Status
	// PeerCertificates is the chain the host sent in its TLS handshake,
	// leaf first, also when it failed the requirement: what check holds
	// against the TLSA records or the policy.
	PeerCertificates []*x509.Certificate
	// Session is the connection that would carry the message.
	Session *SessionReport
	// Probed says this host was dialed; delivery stops at the first host
	// that takes the message, Check dials every host.
	Probed bool
	// Reach is how many of this host's addresses one delivery attempt
	// would dial at most, when Probed: the attempt shares its
	// MaxConnectionsPerAttempt between the hosts and keeps one for each
	// usable host after this one, where Check dials each host in full.
	// It is counted as delivery would on getting here, every host before
	// it having failed; 0 when they would have used every connection.
	Reach int
}

// Reached says a delivery attempt would get as far as Session: the
// addresses that failed before it are fewer than Reach.
func (h HostReport) Reached() bool {
	return h.Session != nil && len(h.Failures) < h.Reach
}

// SessionReport is a connection brought to the point where MAIL would be
// sent, then closed.
type SessionReport struct {
	Addr       netip.Addr
	Greeting   string // host name from the 220 greeting
	Extensions []string
	// TLS is nil when the session stayed in plaintext.
	TLS *tls.ConnectionState
	// Protection says in words what protected the session:
	// "verified TLS, MTA-STS enforce".
	Protection string
	// TLSProblem is a certificate failure that MTA-STS testing tolerated.
	TLSProblem string
}

// Certificate is the server's leaf certificate, or nil.
func (s *SessionReport) Certificate() *x509.Certificate {
	if s.TLS == nil || len(s.TLS.PeerCertificates) == 0 {
		return nil
	}
	return s.TLS.PeerCertificates[0]
}

// Check plans a delivery to domain as Deliver would and, when connect is
// set, dials every usable host the way Deliver would (port, SNI, STARTTLS,
// certificate checks), stopping before MAIL. No mail is sent.
func (e *Engine) Check(ctx context.Context, domain string, connect bool) *Report {
	return e.CheckFrom(ctx, domain, anySender, connect)
}

// CheckFrom is Check for mail from sender ("" for the null sender of
// bounces), for sender-dependent routes.
func (e *Engine) CheckFrom(ctx context.Context, domain, sender string, connect bool) *Report {
	domain = canonicalDomain(domain)
	p := e.plan(ctx, e.nexthop(domain, sender))
	r := &Report{Domain: domain, NextHop: p.nh, Implicit: p.implicit, Status: p.status, Connected: connect}
	if p.status != nil {
		r.Outcome = *p.status
		return r
	}
	var fails []*hostFailure
	// left are the connections a delivery attempt would still have
	// (Deliver): a check dials every host in full, to show them all, and
	// counts for Outcome only the dials delivery would make.
	left := MaxConnectionsPerAttempt
	pending := false
	for i, h := range p.hops {
		hr := HostReport{MX: h.mx, Addrs: h.addrs, Requirement: p.reqs[i]}
		switch f := e.precheck(h.mx, p.reqs[i], false); {
		case h.unusable != nil:
			hr.NotUsed = &h.unusable.status
			fails = append(fails, h.unusable)
		case f != nil:
			hr.NotUsed = &f.status
			fails = append(fails, f)
		case !connect:
			pending = true
		default:
			hr.Probed = true
			if left > 0 {
				hr.Reach = share(left, e.usableAfter(&p, i, queue.Envelope{}))
			}
			// A check shows the certificate each address sends today:
			// with resumption the second address of a host (sessions are
			// kept per name) would show the first one's.
			h.fresh = true
			budget := MaxConnectionsPerAttempt
			s, fs := e.connect(ctx, p.nh, h, p.reqs[i], false, &budget)
			for _, f := range fs {
				hr.Failures = append(hr.Failures, f.status)
				if len(f.peerCerts) > 0 {
					hr.PeerCertificates = f.peerCerts
				}
			}
			// The hosts after this one see the connections delivery would
			// have left on reaching them: this host failing at every
			// address it may dial, or at the ones that did fail.
			if s != nil {
				left -= min(len(h.addrs), hr.Reach)
				hr.Session = s.report()
				if s.tls != nil {
					hr.PeerCertificates = s.tls.PeerCertificates
				}
			} else {
				left -= min(MaxConnectionsPerAttempt-budget, hr.Reach)
			}
			if r.Via == "" {
				switch {
				case hr.Reach == 0:
					fails = append(fails, notTried(h.mx.Name))
				case !hr.Reached():
					if len(fs) > hr.Reach {
						fs = fs[:hr.Reach]
						for _, f := range fs {
							// What spoke for them is beyond reach.
							f.spokenFor = false
						}
					}
					fails = append(fails, fs...)
				}
			}
			if s == nil {
				break
			}
			if r.Via == "" && hr.Reached() {
				r.Via = s.label
				r.Outcome = queue.Status{Code: 250, Enhanced: "2.0.0",
					Text: "would deliver to " + s.label + " (" + hr.Session.Protection + ")"}
			}
			s.quitQuietly()
			e.releaseSlot(h.key)
		}
		r.Hosts = append(r.Hosts, hr)
	}
	if r.Via == "" && !pending {
		r.Outcome = aggregate(p.nh, fails)
	}
	return r
}

// report describes the session for Check.
func (s *session) report() *SessionReport {
	sr := &SessionReport{Addr: s.addr, Greeting: s.helo, TLS: s.tls, TLSProblem: s.tlsProblem,
		Protection: protection(s.req, s.tls, s.tlsProblem)}
	for _, ext := range []string{"STARTTLS", "SIZE", "8BITMIME", "SMTPUTF8", "DSN", "REQUIRETLS",
		"PIPELINING", "CHUNKING", "ENHANCEDSTATUSCODES"} {
		if ok, _ := s.client.Extension(ext); ok {
			sr.Extensions = append(sr.Extensions, ext)
		}
	}
	return sr
}

// protection says in words what protected a session, as an operator greps
// for it: "verified TLS, MTA-STS enforce", "DANE-authenticated TLS",
// "TLS, certificate not checked", "plaintext".
func protection(req policy.Requirement, cs *tls.ConnectionState, problem string) string {
	if cs == nil {
		if req.Security == policy.SecurityNone {
			return "plaintext, as the local policy says"
		}
		return "plaintext, STARTTLS not available"
	}
	// One concatenation, no builder: this is on every attempt's log line.
	var auth, source string
	switch {
	case problem != "":
		auth = "TLS, certificate NOT valid (" + problem + ")"
	case req.Security == policy.SecurityDANE:
		auth = "DANE-authenticated TLS"
	case req.Security == policy.SecurityVerify:
		auth = "verified TLS"
	default:
		auth = "TLS, certificate not checked"
	}
	switch req.Source() {
	case policy.TypeSTS:
		if req.Testing {
			source = ", MTA-STS testing"
		} else {
			source = ", MTA-STS enforce"
		}
	case policy.TypeTLSA:
		source = ", DANE"
	case policy.TypeLocal:
		source = ", local policy " + req.Security.String()
	}
	return auth + source
}
