package delivery

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"

	"golang.org/x/time/rate"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/routing"
)

// Route is one [[delivery.route]] entry: mail for Domains, from Senders
// (none: any sender), goes to Nexthop instead of the domain's MX hosts.
type Route struct {
	// Name names the route in logs and `stsrelay check`:
	// "delivery.route[2]". Never the credentials.
	Name    string
	Domains []string // routing.ParsePattern forms
	Senders []string // routing.ParseSender forms
	// Nexthop is "[host]:port" (that host's addresses, no MX lookup),
	// "name:port" or "name" (MX lookup of name); the port defaults to 25.
	Nexthop     string
	ImplicitTLS bool // TLS from the first byte, as on port 465 (RFC 8314 §3.3)
	// TLS is the route's level as a [[delivery.policy]] gives it: may,
	// encrypt, verify, dane-only, none; "dane" or "" leaves it to DNS,
	// except that "" means verify when the route has credentials.
	TLS string
	// Auth, when set, is sent with SASL PLAIN or LOGIN once TLS is up and
	// verified as TLS demands; never without TLS.
	Auth    *Credentials
	Shaping Shaping
}

// Credentials are an upstream account. They print as "[redacted]".
type Credentials struct {
	Username, Password string
}

func (c Credentials) String() string       { return "[redacted]" }
func (c Credentials) GoString() string     { return "[redacted]" }
func (c Credentials) LogValue() slog.Value { return slog.StringValue("[redacted]") }

// Shaping limits the traffic to one destination; zero fields keep the
// defaults (Options.MaxConnsPerDomain connections, no other limit).
type Shaping struct {
	MaxConnections int
	// MaxMessagesPerConn counts mail transactions (MAIL commands): a
	// message sent in several counts once for each.
	MaxMessagesPerConn int
	// Rate is messages per second, evenly spaced (a burst of one); 0 is
	// no limit.
	Rate rate.Limit
}

// Limit is one [[delivery.limits]] entry. With Domains each matching
// recipient domain gets the limits on its own; with MXHosts every MX host
// matching counts toward one shared limit, as one provider (".google.com").
type Limit struct {
	Domains []string
	MXHosts []string
	Shaping Shaping
}

// NextHop is where mail for one recipient domain goes, as the routes
// decide before any DNS lookup.
type NextHop struct {
	Domain string // the recipient domain
	// Route is the name of the route that matched; "" means the domain's
	// own MX hosts.
	Route string
	// Host is what is looked up: the recipient domain, a route's host or
	// an address.
	Host string
	Port int
	// MX says Host's MX records are looked up; otherwise Host's own
	// addresses are used, or Addr when it is valid (no DNS at all).
	MX          bool
	Addr        netip.Addr
	ImplicitTLS bool
	// PolicyDomain is the domain whose MTA-STS policy applies: the
	// recipient domain, or the host a route names (RFC 8461 §3.4, smart
	// hosts); "" for an address, which has no policy (RFC 8461 §3.4, RFC
	// 7672 §2.2).
	PolicyDomain string

	auth *Credentials
	// local is the route's own TLS level, applied as a [[delivery.policy]]
	// entry would be; nil leaves the [[delivery.policy]] table and DNS.
	local   *localLevel
	shaping Shaping
	shaped  bool // the route set limits of its own
}

// HasAuth reports whether the next hop gets credentials.
func (n NextHop) HasAuth() bool { return n.auth != nil }

// String is the next hop as a route writes it: "[host]:port", "name:port".
func (n NextHop) String() string {
	if n.Addr.IsValid() && n.Route == "" {
		return n.Domain // an address literal names itself: "[192.0.2.1]"
	}
	return routing.Nexthop{Host: n.Host, Port: n.Port, MX: n.MX}.String()
}

// TLSLevel is the route's own TLS level as the configuration writes it,
// "" when it leaves it to [[delivery.policy]] and DNS.
func (n NextHop) TLSLevel() string {
	if n.local == nil {
		return ""
	}
	return levelName(n.local.Security)
}

// dest identifies the connections that may carry this next hop's mail:
// the recipient domain for MX routing, else the route's target with its
// account (never shown anywhere).
func (n NextHop) dest() string {
	if n.Route == "" {
		return n.Domain
	}
	d := fmt.Sprintf("route|%s|%t", n.String(), n.ImplicitTLS)
	if n.auth != nil {
		d += "|" + n.auth.Username
	}
	return d
}

// metricName names the next hop in metrics: the recipient domain or the
// route's nexthop, never an account.
func (n NextHop) metricName() string {
	if n.Route == "" {
		return n.Domain
	}
	return n.String()
}

// tables are the per-destination tables; SetRoutes swaps them whole.
type tables struct {
	routes    *routing.Table[*compiledRoute]
	overrides *routing.Table[localLevel]
	byDomain  *routing.Table[Shaping]
	byMX      *routing.Table[mxLimit]
}

type compiledRoute struct {
	name        string
	nh          routing.Nexthop
	implicitTLS bool
	local       *localLevel
	auth        *Credentials
	shaping     Shaping
}

type mxLimit struct {
	key     string
	shaping Shaping
}

// compileTables checks and compiles the three tables.
func compileTables(overrides []Override, routes []Route, limits []Limit) (*tables, error) {
	t := &tables{}
	var oe []routing.Entry[localLevel]
	for i, o := range overrides {
		if len(o.Domains) == 0 {
			return nil, errors.New("delivery: a policy override has an empty domain")
		}
		pats, err := patterns(o.Domains)
		if err != nil {
			return nil, fmt.Errorf("delivery: policy override: %w", err)
		}
		if o.TLS < policy.SecurityMay || o.TLS > policy.SecurityDANE {
			return nil, fmt.Errorf("delivery: policy override for %s: unknown tls level %d", o.Domains[0], o.TLS)
		}
		name := o.Name
		if name == "" {
			name = fmt.Sprintf("policy %d", i)
		}
		level := levelName(o.TLS)
		if o.Published {
			level = "dane"
		}
		oe = append(oe, routing.Entry[localLevel]{Domains: pats, Value: localLevel{
			Local:   policy.Local{Security: o.TLS, Published: o.Published},
			setting: fmt.Sprintf("%s tls = %q", name, level)}})
	}
	var err error
	if t.overrides, err = routing.NewTable(oe); err != nil {
		return nil, fmt.Errorf("delivery: policy overrides: %w", err)
	}

	var re []routing.Entry[*compiledRoute]
	for i, r := range routes {
		name := r.Name
		if name == "" {
			name = fmt.Sprintf("route %d", i)
		}
		pats, err := patterns(r.Domains)
		if err != nil || len(pats) == 0 {
			return nil, fmt.Errorf("delivery: %s: domains: %v", name, orEmpty(err))
		}
		var senders []routing.SenderPattern
		for _, s := range r.Senders {
			sp, err := routing.ParseSender(s)
			if err != nil {
				return nil, fmt.Errorf("delivery: %s: %w", name, err)
			}
			senders = append(senders, sp)
		}
		nh, err := routing.ParseNexthop(r.Nexthop)
		if err != nil {
			return nil, fmt.Errorf("delivery: %s: %w", name, err)
		}
		cr := &compiledRoute{name: name, nh: nh, implicitTLS: r.ImplicitTLS, auth: r.Auth, shaping: r.Shaping}
		switch level := strings.ToLower(strings.TrimSpace(r.TLS)); level {
		case "", "dane":
			// Postfix's "dane" is opportunistic DANE: what DNS publishes.
			if r.Auth != nil && level == "" {
				cr.local = &localLevel{Local: policy.Local{Security: policy.SecurityVerify},
					setting: name + ` has credentials, so tls = "verify"`}
			}
		default:
			sec, err := policy.ParseSecurity(level)
			if err != nil {
				return nil, fmt.Errorf("delivery: %s: %w", name, err)
			}
			cr.local = &localLevel{Local: policy.Local{Security: sec}, setting: fmt.Sprintf("%s tls = %q", name, level)}
		}
		if r.Auth != nil && (r.Auth.Username == "" || r.Auth.Password == "") {
			return nil, fmt.Errorf("delivery: %s: credentials need a username and a password", name)
		}
		if r.Auth != nil && cr.local != nil && cr.local.Security == policy.SecurityNone {
			return nil, fmt.Errorf("delivery: %s: tls none with credentials would send the password in the clear", name)
		}
		if r.ImplicitTLS && cr.local != nil && cr.local.Security == policy.SecurityNone {
			return nil, fmt.Errorf("delivery: %s: tls none contradicts implicit TLS", name)
		}
		if err := checkShaping(r.Shaping); err != nil {
			return nil, fmt.Errorf("delivery: %s: %w", name, err)
		}
		re = append(re, routing.Entry[*compiledRoute]{Domains: pats, Senders: senders, Value: cr})
	}
	if t.routes, err = routing.NewTable(re); err != nil {
		return nil, fmt.Errorf("delivery: routes: %w", err)
	}

	var de []routing.Entry[Shaping]
	var me []routing.Entry[mxLimit]
	for _, l := range limits {
		if (len(l.Domains) == 0) == (len(l.MXHosts) == 0) {
			return nil, errors.New("delivery: a limit needs domains or mx_hosts, not both")
		}
		if err := checkShaping(l.Shaping); err != nil {
			return nil, fmt.Errorf("delivery: limit: %w", err)
		}
		if len(l.Domains) > 0 {
			pats, err := patterns(l.Domains)
			if err != nil {
				return nil, fmt.Errorf("delivery: limit: %w", err)
			}
			de = append(de, routing.Entry[Shaping]{Domains: pats, Value: l.Shaping})
			continue
		}
		pats, err := patterns(l.MXHosts)
		if err != nil {
			return nil, fmt.Errorf("delivery: limit: %w", err)
		}
		var names []string
		for _, p := range pats {
			names = append(names, p.String())
		}
		me = append(me, routing.Entry[mxLimit]{Domains: pats, Value: mxLimit{key: "mx " + strings.Join(names, ","), shaping: l.Shaping}})
	}
	if t.byDomain, err = routing.NewTable(de); err != nil {
		return nil, fmt.Errorf("delivery: limits: %w", err)
	}
	if t.byMX, err = routing.NewTable(me); err != nil {
		return nil, fmt.Errorf("delivery: limits: %w", err)
	}
	return t, nil
}

func orEmpty(err error) error {
	if err == nil {
		return errors.New("none given")
	}
	return err
}

func patterns(list []string) ([]routing.Pattern, error) {
	var out []routing.Pattern
	for _, s := range list {
		p, err := routing.ParsePattern(s)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

func checkShaping(s Shaping) error {
	if s.MaxConnections < 0 || s.MaxMessagesPerConn < 0 || s.Rate < 0 {
		return fmt.Errorf("limits must not be negative: %+v", s)
	}
	return nil
}

// SetRoutes replaces the [[delivery.policy]], [[delivery.route]] and
// [[delivery.limits]] tables (SIGHUP). Deliveries under way finish with
// what they started with; idle connections of a route that changed are
// not reused, since their key names the old target or account.
func (e *Engine) SetRoutes(overrides []Override, routes []Route, limits []Limit) error {
	t, err := compileTables(overrides, routes, limits)
	if err != nil {
		return err
	}
	e.tables.Store(t)
	return nil
}

// nexthop decides where mail for domain from sender goes: a route's
// target, an address literal's address, or the domain's MX hosts.
func (e *Engine) nexthop(domain, sender string) NextHop {
	if strings.HasPrefix(domain, "[") {
		// RFC 5321 §4.1.3: user@[192.0.2.1] goes to that address, no DNS;
		// a literal that does not parse fails in route.
		nh := NextHop{Domain: domain, Host: domain, Port: 25}
		lit := strings.TrimSuffix(strings.TrimPrefix(domain, "["), "]")
		if len(lit) > 5 && strings.EqualFold(lit[:5], "ipv6:") {
			lit = lit[5:]
		}
		if a, err := netip.ParseAddr(lit); err == nil && a.Zone() == "" {
			nh.Addr = a.Unmap()
		}
		return nh
	}
	t := e.tables.Load()
	if r, _, ok := t.routes.Lookup(domain, sender); ok {
		nh := NextHop{Domain: domain, Route: r.name, Host: r.nh.Host, Port: r.nh.Port, MX: r.nh.MX, Addr: r.nh.Addr,
			ImplicitTLS: r.implicitTLS, auth: r.auth, local: r.local, shaping: r.shaping, shaped: r.shaping != (Shaping{})}
		if !nh.Addr.IsValid() {
			// RFC 8461 §3.4: for a smart host the policy domain is the
			// smart host's, not the recipient's.
			nh.PolicyDomain = r.nh.Host
		}
		return nh
	}
	return NextHop{Domain: domain, Host: domain, Port: 25, MX: true, PolicyDomain: domain}
}

// shapingFor decides the shaping key and limits of one MX host of nh: a
// route's own limits, else an mx_hosts limit that the host (or its CNAME
// target) matches, else the recipient domain's (routes: the nexthop's)
// own, with a [[delivery.limits]] domains entry if one matches.
func (e *Engine) shapingFor(nh NextHop, mx policy.MX) (string, Shaping) {
	// Keys name destinations, never accounts: they appear in logs. A
	// route with limits of its own keeps them to itself: another route to
	// the same next hop (another tenant's) must neither share its rate
	// and connections nor, sharing the key, replace its limits.
	if nh.shaped {
		return nh.Route + " nexthop " + nh.String(), nh.shaping
	}
	t := e.tables.Load()
	for _, name := range []string{mx.Name, mx.Final} {
		if l, _, ok := t.byMX.Lookup(name, ""); ok && name != "" {
			return l.key, l.shaping
		}
	}
	if nh.Route != "" {
		return "nexthop " + nh.String(), Shaping{}
	}
	s, _, _ := t.byDomain.Lookup(nh.Domain, "")
	return "domain " + nh.Domain, s
}
