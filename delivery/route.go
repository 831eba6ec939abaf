package delivery

import (
	"cmp"
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/resolve"
)

// hop is one MX host of a route with its addresses, or the reason it
// cannot be used (then it is never dialed).
type hop struct {
	mx    policy.MX
	addrs []netip.Addr
	// unusable says why this MX cannot be dialed: its target is an IP
	// literal, or its address lookup failed or found nothing.
	unusable *hostFailure
	// literal is an address without a name: no MTA-STS or DANE apply
	// (RFC 8461 §3.4, RFC 7672 §2.2).
	literal bool
	// validated says the MX name is authenticated: DNSSEC vouched for the
	// MX answer and the alias chain to the addresses, or a route named
	// the host.
	validated bool
	// key and shaping are the traffic limits this host counts toward.
	key     string
	shaping Shaping
	// fresh asks for full TLS handshakes that neither resume a session
	// nor leave one to resume (check).
	fresh bool
}

// route returns the hosts to try for nh, best first (RFC 5321 §5.1), or
// the status every recipient gets when there is nowhere to go.
func (e *Engine) route(ctx context.Context, nh NextHop) (hops []hop, implicit bool, _ *queue.Status) {
	hops, implicit, st := e.hops(ctx, nh)
	if st != nil && nh.Route != "" && st.Permanent() {
		// A route's host that does not exist is the operator's mistake,
		// not the recipient's: defer until the configuration is fixed.
		st.Code, st.Enhanced = 451, "4.4.4"
	}
	if st != nil && nh.Route != "" {
		st.Text += fmt.Sprintf(" (nexthop %s of %s)", nh, nh.Route)
	}
	for i := range hops {
		hops[i].mx.Port = uint16(nh.Port)
		hops[i].key, hops[i].shaping = e.shapingFor(nh, hops[i].mx)
	}
	return hops, implicit, st
}

// hops looks up the hosts of nh: its address, its host's addresses, or
// the MX hosts of its host (implicit: there are none, so the host itself).
func (e *Engine) hops(ctx context.Context, nh NextHop) (_ []hop, implicit bool, _ *queue.Status) {
	switch {
	case nh.Addr.IsValid():
		name := "[" + nh.Addr.String() + "]"
		if nh.Route == "" {
			name = nh.Domain // as the recipient wrote it
		}
		return []hop{{mx: policy.MX{Name: name, Final: name}, addrs: []netip.Addr{nh.Addr}, literal: true}}, false, nil
	case strings.HasPrefix(nh.Host, "["):
		return nil, false, &queue.Status{Code: 550, Enhanced: "5.1.2", Text: fmt.Sprintf("%s is not a valid address literal", nh.Host)}
	case !nh.MX:
		// "[host]:port": that host's addresses, no MX lookup. The name
		// comes from our configuration, so it is as trusted as a
		// DNSSEC-validated MX answer (RFC 7672 §2.2.2: non-MX destination).
		h := e.resolveHop(ctx, policy.MX{Name: nh.Host, Final: nh.Host}, true)
		if h.unusable != nil {
			st := h.unusable.status
			return nil, false, &st
		}
		h.validated = true
		return []hop{h}, false, nil
	}
	domain := nh.Host
	records, secure, err := e.opts.Resolver.MX(ctx, domain)
	if err != nil {
		if resolve.IsNotFound(err) {
			// RFC 5321 §5.1: a name that does not exist is a permanent error.
			return nil, false, &queue.Status{Code: 550, Enhanced: "5.1.2",
				Text: fmt.Sprintf("domain %s does not exist (MX lookup: NXDOMAIN)", domain)}
		}
		// A temporary DNS failure defers; it never bounces (RFC 5321 §5.1).
		return nil, false, &queue.Status{Code: 451, Enhanced: "4.4.3", Text: err.Error()}
	}

	var mxs []policy.MX
	nullMX := false
	for _, rr := range records {
		target := strings.ToLower(strings.TrimSuffix(rr.Mx, "."))
		if target == "" {
			nullMX = true
			continue
		}
		mxs = append(mxs, policy.MX{Name: target, Final: target, Preference: rr.Preference})
	}
	if nullMX && len(mxs) == 0 {
		// RFC 7505 §3: "0 ." says the domain accepts no mail at all.
		return nil, false, &queue.Status{Code: 550, Enhanced: "5.1.10",
			Text: fmt.Sprintf("%s does not accept mail (null MX)", domain)}
	}
	// A null MX mixed with real ones breaks RFC 7505 §3 ("MUST NOT
	// advertise any other MX RR"); we decide for the real ones, because
	// the domain evidently does run mail servers, and ignore the null MX.
	if nullMX {
		e.log.Warn("null MX mixed with other MX records; using the others", "domain", domain)
	}

	if len(mxs) == 0 {
		// RFC 5321 §5.1: no MX records means an implicit MX on the domain
		// itself, with preference 0.
		h := e.resolveHop(ctx, policy.MX{Name: domain, Final: domain}, secure)
		if h.unusable != nil {
			st := h.unusable.status
			if h.unusable.notFound {
				st = queue.Status{Code: 550, Enhanced: "5.4.4",
					Text: fmt.Sprintf("%s has no MX records and no address to deliver to", domain)}
			}
			return nil, true, &st
		}
		return []hop{h}, true, nil
	}

	// RFC 5321 §5.1: sort by preference, random order among equals so that
	// load spreads as the domain intended.
	rand.Shuffle(len(mxs), func(i, j int) { mxs[i], mxs[j] = mxs[j], mxs[i] })
	slices.SortStableFunc(mxs, func(a, b policy.MX) int { return cmp.Compare(a.Preference, b.Preference) })
	// A host listed twice (at two preferences, or twice at one) is one
	// host: tried once, at its best preference. Dialling a host that is
	// down a second time only spends the attempt's connections.
	seen := make(map[string]bool, len(mxs))
	mxs = slices.DeleteFunc(mxs, func(m policy.MX) bool {
		dup := seen[m.Name]
		seen[m.Name] = true
		return dup
	})

	// RFC 5321 §5.1: when we are among the MX hosts, only hosts with a
	// better preference than ours may be used, or mail loops.
	if i := slices.IndexFunc(mxs, func(m policy.MX) bool { return m.Name == e.hostname }); i >= 0 {
		own := mxs[i].Preference
		mxs = slices.DeleteFunc(mxs, func(m policy.MX) bool { return m.Preference >= own })
		if len(mxs) == 0 {
			return nil, false, &queue.Status{Code: 550, Enhanced: "5.4.6",
				Text: fmt.Sprintf("mail for %s loops back to myself (%s is its best MX host)", domain, e.hostname)}
		}
	}

	hops := make([]hop, 0, len(mxs))
	for _, mx := range mxs {
		hops = append(hops, e.resolveHop(ctx, mx, secure))
	}
	return hops, false, nil
}

// resolveHop looks up the addresses of mx, following CNAMEs, and records
// the final name and the alias chain that MTA-STS and DANE need. mxSecure
// says the MX answer was DNSSEC-validated.
func (e *Engine) resolveHop(ctx context.Context, mx policy.MX, mxSecure bool) hop {
	mx.MXSecure = mxSecure
	h := hop{mx: mx}
	name := strings.Trim(mx.Name, "[]")
	if _, err := netip.ParseAddr(name); err == nil {
		// RFC 5321 §5.1: an MX target is a host name; an address here is a
		// misconfiguration that some senders tolerate, but we do not.
		h.unusable = &hostFailure{host: mx.Name, kind: failRoute, status: queue.Status{
			Code: 451, Enhanced: "4.4.4", Text: fmt.Sprintf("%s: MX target is an IP address, not a host name", mx.Name)}}
		return h
	}
	addrs, res, err := e.opts.Resolver.Addrs(ctx, mx.Name, e.opts.IPVersion)
	if err != nil {
		h.unusable = &hostFailure{host: mx.Name, kind: failRoute, notFound: resolve.IsNotFound(err),
			status: queue.Status{Code: 451, Enhanced: "4.4.3", Text: fmt.Sprintf("%s: %v", mx.Name, err)}}
		if h.unusable.notFound {
			h.unusable.status.Enhanced = "4.4.4"
			h.unusable.status.Text = fmt.Sprintf("%s: host name does not exist (NXDOMAIN)", mx.Name)
		}
		return h
	}
	h.mx.Final = strings.TrimSuffix(res.Final, ".")
	for _, c := range res.CNAMEs {
		h.mx.CNAMEs = append(h.mx.CNAMEs, strings.TrimSuffix(c, "."))
	}
	if len(addrs) == 0 {
		h.unusable = &hostFailure{host: mx.Name, kind: failRoute, notFound: true, status: queue.Status{
			Code: 451, Enhanced: "4.4.4", Text: fmt.Sprintf("%s: host has no %s address", mx.Name, e.familyWords())}}
		return h
	}
	h.addrs = addrs
	// RFC 8689 §4.2.1: an MX name from a DNSSEC-validated answer, reached
	// through validated aliases, is a validated MX for REQUIRETLS.
	h.mx.AddrSecure = res.Secure
	h.mx.AliasSigned = res.AliasSigned
	h.validated = mxSecure && res.Secure
	return h
}

func (e *Engine) familyWords() string {
	switch e.opts.IPVersion {
	case resolve.IPv4:
		return "IPv4"
	case resolve.IPv6:
		return "IPv6"
	}
	return "IPv4 or IPv6"
}
