package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/idna"

	"github.com/stsrelay/stsrelay/admin"
	"github.com/stsrelay/stsrelay/config"
	"github.com/stsrelay/stsrelay/dane"
	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/sts"
)

// Exit codes of check.
const (
	checkDelivers = 0 // every host would take mail as the domain requires
	checkProblem  = 1 // some host, or the domain, would defer or fail
	checkError    = 2 // the check itself could not be made
)

// certExpiryWarning is how soon a certificate's expiry is worth a line of
// advice: time enough for a domain owner to renew.
const certExpiryWarning = 14 * 24 * time.Hour

func runCheck(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("check", "check [-config file] [-json] [-no-connect] [-sender address] domain", `
Check explains how mail to a domain would be delivered now, and why. It
runs the relay's own delivery plan with the relay's configuration: the MX
route (CNAMEs followed, implicit MX, null MX), the TLS each host must offer
and which policy asks for it (a local [[delivery.policy]], the host's DANE
TLSA records, the domain's MTA-STS policy, live or as the running relay
caches it), then connects to each host on port 25 as delivery would (EHLO,
STARTTLS, certificate checks) and stops before MAIL. No mail is sent.

Routes may depend on the sender. Without -sender, check plans for mail
from any sender that no sender-dependent route picks out; -sender '<>'
plans for bounces, the null sender.

For DANE it shows per host the DNSSEC status of each DNS answer, the TLSA
records with their usability, the TLSA base domain used, and whether the
server's certificate matches the records.

Each host ends in a verdict ("would deliver (verified TLS, MTA-STS
enforce)", or "would defer: 451 4.4.8 …" with the status delivery would
record), followed by advice for the domain owner where a common
misconfiguration shows.

Exit status: 0 when every host would deliver under the domain's
requirement, 1 when some host or the domain would defer or fail, 2 when the
check could not be made (DNS failure, unknown domain, bad configuration).

The configuration file gives the resolver, timeouts and policies; without
one at the default path, built-in defaults (/etc/resolv.conf) are used.`, stderr)
	cfgPath := configFlag(fs)
	asJSON := fs.Bool("json", false, "print the result as JSON (see README: 'stsrelay check -json')")
	noConnect := fs.Bool("no-connect", false, "plan only: do not connect to the MX hosts")
	sender := fs.String("sender", "", "envelope sender `address` to plan for, <> for bounces (default: any sender)")
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	if fs.NArg() != 1 || fs.Arg(0) == "" {
		fmt.Fprintln(stderr, "stsrelay check: want exactly one domain")
		fs.Usage()
		return checkError
	}
	domain, err := idna.Lookup.ToASCII(strings.TrimSuffix(strings.TrimSpace(fs.Arg(0)), "."))
	if err != nil || domain == "" || strings.ContainsAny(domain, "@/ ") {
		fmt.Fprintf(stderr, "stsrelay: check: %q is not a domain name\n", fs.Arg(0))
		return checkError
	}
	domain = strings.ToLower(domain)

	cfg, err := loadConfig(*cfgPath)
	if err != nil {
		if _, serr := os.Stat(*cfgPath); flagSet(fs, "config") || !errors.Is(serr, os.ErrNotExist) {
			fail(stderr, "check: %v", err)
			return checkError
		}
		cfg = config.Default()
		cfg.StateDir = "" // no configuration, so no known daemon either
	}
	res, err := newResolver(cfg)
	if err != nil {
		fail(stderr, "check: %v", err)
		return checkError
	}
	parts, err := buildDelivery(cfg, res, nil, nil, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		fail(stderr, "check: %v", err)
		return checkError
	}
	defer parts.engine.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	plan := func(connect bool) *delivery.Report {
		if !flagSet(fs, "sender") {
			// Ordinary mail: the route every sender gets unless a
			// sender-dependent route picks it out.
			return parts.engine.Check(ctx, domain, connect)
		}
		// "<>" is the null sender of bounces, as routes and queue -sender
		// write it; CheckFrom takes it as "".
		return parts.engine.CheckFrom(ctx, domain, strings.Trim(strings.TrimSpace(*sender), "<>"), connect)
	}
	c := &checkResult{Domain: domain}
	// A route to a smart host makes the host's domain the policy domain
	// (RFC 8461 §3.4): learn it from the route, then take the running
	// relay's cached policy for it before planning for real.
	c.PolicyDomain = plan(false).NextHop.PolicyDomain
	if parts.sts != nil && c.PolicyDomain != "" {
		c.primeFromDaemon(ctx, cfg, parts.sts)
	}
	c.report = plan(!*noConnect)
	if parts.dane != nil && c.PolicyDomain != "" && parts.dane.Applies(c.PolicyDomain) {
		c.daneDetails(ctx, parts.dane, time.Now())
	}
	if parts.sts != nil && c.PolicyDomain != "" {
		c.inspection = parts.sts.Inspect(ctx, c.PolicyDomain)
		c.stsChanged(ctx, parts.sts)
	}
	c.build(time.Now())
	if *asJSON {
		if code := printJSON(stdout, stderr, c.json()); code != 0 {
			return checkError
		}
	} else {
		c.write(stdout)
	}
	return c.exit
}

// checkResult is everything check found, before it is printed.
type checkResult struct {
	Domain string
	// PolicyDomain is whose MTA-STS policy applies: the domain, or the
	// smart host a route names; "" for an address.
	PolicyDomain string
	report       *delivery.Report
	inspection   *sts.Inspection
	daemon       *sts.PolicyInfo // the running relay's cached policy
	daemonNote   string          // why daemon is nil
	// textChanged says the policy host now serves a different policy
	// under the id the relay cached.
	textChanged bool

	// dane holds, per host, what DANE found and, when check connected,
	// the server's chain held against the TLSA records; nil entries for
	// hosts DANE was not looked up for.
	dane     []*dane.Host
	daneLive []*dane.Verification

	verdicts []string // per host
	advice   []string
	exit     int
}

// primeFromDaemon asks the running relay for its cached policy and puts it
// in check's own cache, so that the plan follows what the relay applies
// (a cached policy stays in force through a policy host outage).
func (c *checkResult) primeFromDaemon(ctx context.Context, cfg *config.Config, m *sts.Manager) {
	if cfg.StateDir == "" {
		c.daemonNote = "unknown: no configuration file, so no relay to ask"
		return
	}
	var info sts.PolicyInfo
	err := admin.Dial(admin.SocketPath(cfg.StateDir)).Call(ctx, "GET", "/sts/"+url.PathEscape(c.PolicyDomain), nil, &info)
	switch {
	case errors.Is(err, admin.ErrNotRunning):
		c.daemonNote = "no relay running; the live policy is used"
		return
	case err != nil && strings.Contains(err.Error(), "no cached"):
		c.daemonNote = "none"
		if _, why, ok := strings.Cut(err.Error(), "; "); ok {
			c.daemonNote += "; " + why // how its last fetch failed
		}
		return
	case err != nil:
		c.daemonNote = err.Error()
		return
	}
	c.daemon = &info
	if !info.Expired {
		if err := m.Prime(c.PolicyDomain, info.ID, info.Policy, info.Fetched, info.Expires); err != nil {
			c.daemonNote = err.Error()
		}
	}
}

// daneDetails looks up what DANE says of each host, step by step, and
// holds the chain each probed host sent against its TLSA records.
func (c *checkResult) daneDetails(ctx context.Context, src *dane.Source, now time.Time) {
	for _, h := range c.report.Hosts {
		var dh *dane.Host
		var live *dane.Verification
		if len(h.Addrs) > 0 && !strings.HasPrefix(h.MX.Name, "[") {
			dh = src.Lookup(ctx, c.PolicyDomain, h.MX)
			if len(h.PeerCertificates) > 0 && dh.Base != "" {
				live = dh.Verify(h.PeerCertificates, now)
			}
		}
		c.dane = append(c.dane, dh)
		c.daneLive = append(c.daneLive, live)
	}
}

// stsChanged fetches the policy once more when the relay's cached id is
// the published one, to notice a policy changed without a new id (senders
// would keep the old one until it expires, RFC 8461 §3.1).
func (c *checkResult) stsChanged(ctx context.Context, m *sts.Manager) {
	i := c.inspection
	if c.daemon == nil || i.Record == nil || i.Record.ID != c.daemon.ID {
		return
	}
	live, err := m.Fetch(ctx, c.PolicyDomain)
	if err != nil {
		return
	}
	cached, err := sts.Parse([]byte(c.daemon.Policy))
	c.textChanged = err == nil && !slices.Equal(live.Lines(), cached.Lines())
}

// stsPolicy is the MTA-STS policy in force, or nil.
func (c *checkResult) stsPolicy() *sts.Policy {
	if c.inspection == nil || c.inspection.Applied == nil {
		return nil
	}
	return c.inspection.Applied.Policy
}

// build decides the verdicts, the advice and the exit status.
func (c *checkResult) build(now time.Time) {
	r := c.report
	switch {
	case r.Status == nil:
	case r.Status.Enhanced == "4.4.3" || r.Status.Enhanced == "5.1.2":
		c.exit = checkError
	default:
		c.exit = checkProblem
	}
	for _, h := range r.Hosts {
		v := hostVerdict(h, r.Connected)
		if !strings.HasPrefix(v, "would deliver") && !strings.HasPrefix(v, "would try") {
			c.exit = max(c.exit, checkProblem)
		}
		c.verdicts = append(c.verdicts, v)
	}
	if r.Status == nil && r.Outcome.Code != 0 && !r.Outcome.Delivered() {
		c.exit = max(c.exit, checkProblem)
	}

	p := c.stsPolicy()
	if i := c.inspection; i != nil && i.Published() {
		if i.RecordErr != nil {
			c.advice = append(c.advice, fmt.Sprintf("The _mta-sts TXT record is not valid (%v): senders ignore the policy.", i.RecordErr))
		}
		if i.FetchErr != nil {
			c.advice = append(c.advice, fmt.Sprintf("The policy could not be fetched (%v). Senders without a cached policy deliver without MTA-STS.", i.FetchErr))
		}
	}
	if c.textChanged {
		c.advice = append(c.advice, "The policy host serves a policy that differs from the one cached under the same id: change the id in the _mta-sts TXT record whenever the policy changes (RFC 8461 §3.1), or senders keep the old one until it expires.")
	}
	if p != nil && p.Mode != sts.ModeNone {
		if p.MaxAge < 24*time.Hour {
			c.advice = append(c.advice, fmt.Sprintf("max_age is %s; RFC 8461 §3.2 suggests weeks or more, so that a policy survives an outage of the policy host.", p.MaxAge))
		}
		for _, pat := range p.MX {
			if !slices.ContainsFunc(r.Hosts, func(h delivery.HostReport) bool {
				pp := &sts.Policy{MX: []string{pat}}
				return pp.Match(h.MX.Name) || pp.Match(h.MX.Final)
			}) && r.Status == nil {
				c.advice = append(c.advice, fmt.Sprintf("The policy's mx pattern %q matches no MX host of %s.", pat, c.PolicyDomain))
			}
		}
	}
	for i, h := range r.Hosts {
		if len(h.MX.CNAMEs) > 0 {
			c.advice = append(c.advice, cnameAdvice(c.Domain, h.MX, p))
		}
		if i < len(c.dane) && c.dane[i] != nil {
			c.advice = append(c.advice, daneAdvice(c.dane[i], c.daneLive[i])...)
		}
		if h.Session != nil {
			if cert := h.Session.Certificate(); cert != nil && cert.NotAfter.Sub(now) < certExpiryWarning {
				c.advice = append(c.advice, fmt.Sprintf("The certificate of %s expires %s.", h.MX.Name, cert.NotAfter.UTC().Format(time.RFC3339)))
			}
		}
	}
}

// cnameAdvice explains an MX target that is an alias, and how senders that
// read RFC 8461 §4.1 differently treat it under the domain's policy p.
func cnameAdvice(domain string, mx policy.MX, p *sts.Policy) string {
	msg := fmt.Sprintf("MX target %s is a CNAME of %s (RFC 2181 §10.3 says an MX target must not be an alias).", mx.Name, mx.Final)
	if p == nil || p.Mode == sts.ModeNone {
		return msg
	}
	byName, byTarget := p.Match(mx.Name), p.Match(mx.Final)
	switch {
	case byName && !byTarget:
		msg += fmt.Sprintf(" The MTA-STS policy lists %s, as RFC 8461 §4.1 asks, but some large senders match the CNAME target %s instead and defer mail for %s (451 4.4.8). Fix: add \"mx: %s\" to the policy, or point the MX record at the host itself.", mx.Name, mx.Final, domain, mx.Final)
	case !byName && byTarget:
		msg += fmt.Sprintf(" The MTA-STS policy lists only the CNAME target %s; senders that follow RFC 8461 §4.1 (this relay among them, unless sts.match_cname_target is set) match the MX record's own name %s and defer mail for %s (451 4.4.8). Fix: add \"mx: %s\" to the policy, or point the MX record at the host itself.", mx.Final, mx.Name, domain, mx.Name)
	case !byName && !byTarget:
		msg += " The MTA-STS policy lists neither name."
	}
	return msg
}

// daneAdvice is what the owner of a host's TLSA records should fix.
func daneAdvice(h *dane.Host, live *dane.Verification) []string {
	var out []string
	if h.Requirement.Excluded() {
		out = append(out, fmt.Sprintf("%s: %s in a DNSSEC-signed zone: senders that use DANE defer mail to this host until the zone answers with valid signatures.",
			h.MX.Name, h.Requirement.Skip))
	}
	if live != nil {
		for _, a := range live.Advice {
			out = append(out, h.MX.Name+": "+a+".")
		}
	}
	return out
}

// writeDANE prints what DANE found for one host.
func writeDANE(w io.Writer, h *dane.Host, live *dane.Verification) {
	say(w, "      DANE: %s\n", h.Note)
	var steps []string
	for _, st := range h.Steps {
		sec := "insecure"
		if st.Secure {
			sec = "secure"
		}
		if st.Answer != "" {
			sec += ", " + st.Answer
		}
		steps = append(steps, st.Query+" ("+sec+")")
	}
	say(w, "        DNSSEC: %s\n", strings.Join(steps, "; "))
	if len(h.Candidates) > 0 {
		base := h.Base
		if base == "" {
			base = "none"
		}
		say(w, "        TLSA base domain: %s (tried in order: %s)\n", base, strings.Join(h.Candidates, ", "))
	}
	for i, r := range h.Records {
		use := "usable"
		if !r.Usable {
			use = "not usable: " + r.Why
		}
		if live != nil {
			if live.Matches[i] == 0 {
				use += "; matches the server's certificate"
			} else if live.Matches[i] > 0 {
				use += fmt.Sprintf("; matches certificate %d of the server's chain", live.Matches[i]+1)
			}
		}
		say(w, "        TLSA %s: %s\n", shortRecord(r), use)
	}
	switch {
	case live == nil:
	case live.Failure != nil:
		say(w, "        live certificate: FAILS the TLSA records: %s\n", live.Failure.Reason)
	case h.Requirement.DANE != nil:
		say(w, "        live certificate: authenticated by the TLSA records\n")
	}
}

// shortRecord is a TLSA record with long data cut, for one line.
func shortRecord(r dane.Record) string {
	s := r.String()
	if len(s) > 6+24 {
		s = s[:6+24] + "…"
	}
	return s
}

// hostVerdict is the last line about one host.
func hostVerdict(h delivery.HostReport, connected bool) string {
	switch {
	case h.NotUsed != nil:
		return "would not use this host: " + h.NotUsed.String()
	case h.Probed && h.Reach == 0:
		return fmt.Sprintf("would not try this host: the hosts before it use every connection of a delivery attempt (at most %d)", delivery.MaxConnectionsPerAttempt)
	case h.Session != nil && !h.Reached():
		return fmt.Sprintf("would defer: a delivery attempt dials at most %d of this host's addresses, and the first %d failed (the session shown is at address %d)",
			h.Reach, h.Reach, len(h.Failures)+1)
	case h.Session != nil:
		return "would deliver (" + h.Session.Protection + ")"
	case h.Probed && len(h.Failures) > 0:
		// The last address a delivery attempt would dial.
		st := h.Failures[min(len(h.Failures), h.Reach)-1]
		if st.Permanent() {
			return "would fail: " + st.String()
		}
		return "would defer: " + st.String()
	case !connected:
		return "would try (not connected: -no-connect)"
	}
	return "not tried"
}

// requirementWords says what a requirement demands, and who asks.
func requirementWords(req policy.Requirement, mx string) string {
	var what string
	switch req.Security {
	case policy.SecurityNone:
		what = "no TLS"
	case policy.SecurityMay:
		what = "STARTTLS if offered, any certificate, else plaintext"
	case policy.SecurityEncrypt:
		what = "TLS, any certificate"
	case policy.SecurityVerify:
		names := req.Names
		if len(names) == 0 {
			names = []string{mx}
		}
		what = "TLS with a certificate valid for " + strings.Join(names, " or ")
	case policy.SecurityDANE:
		what = "TLS authenticated by TLSA records"
	}
	switch req.Source() {
	case policy.TypeSTS:
		mode := "enforce"
		if req.Testing {
			mode = "testing: failures reported, mail delivered anyway"
		}
		what += fmt.Sprintf(" (MTA-STS %s, policy domain %s)", mode, req.Domain())
	case policy.TypeTLSA:
		what += fmt.Sprintf(" (DANE, TLSA base domain %s)", req.ServerName)
	case policy.TypeLocal:
		// The setting that applies, as the configuration writes it:
		// (delivery.policy[1] tls = "dane-only").
		what += " (" + strings.Join(req.Policy.Strings, "; ") + ")"
	default:
		what += " (no policy published)"
	}
	if req.Skip != "" {
		what += "; " + req.Skip
	}
	return what
}

// write prints the result for a person.
func (c *checkResult) write(w io.Writer) {
	r := c.report
	say(w, "Delivery check of %s (no mail is sent)\n", c.Domain)

	if i := c.inspection; i != nil {
		say(w, "\nMTA-STS:\n")
		if d := i.Discovery; d != nil {
			for _, cn := range d.CNAMEs {
				say(w, "  _mta-sts.%s: CNAME to %s\n", i.Domain, strings.TrimSuffix(cn, "."))
			}
			for _, t := range d.STS {
				say(w, "  TXT %s\n", strconv.Quote(t))
			}
		}
		switch {
		case i.Record != nil:
			say(w, "  record OK: policy id %s\n", i.Record.ID)
		case i.Published():
			say(w, "  PROBLEM: %v\n", i.RecordErr)
		case errors.Is(i.RecordErr, sts.ErrNoRecord):
			say(w, "  none: %s does not publish MTA-STS\n", i.Domain)
		default:
			say(w, "  unknown: %v\n", i.RecordErr)
		}
		if i.FetchErr != nil {
			kind := ""
			var fe *sts.FetchError
			if errors.As(i.FetchErr, &fe) {
				kind = " [" + string(fe.ResultType) + "]"
			}
			say(w, "  PROBLEM%s: %v\n", kind, i.FetchErr)
		}
		if a := i.Applied; a != nil {
			say(w, "  policy in force: id %s, mode %s, max_age %s, mx %s, expires %s\n", a.ID, a.Policy.Mode,
				a.Policy.MaxAge, strings.Join(a.Policy.MX, " "), a.Expires.UTC().Format(time.RFC3339))
		}
		switch {
		case !i.Published() && i.Applied == nil:
		case c.daemon != nil:
			state := "in force"
			if c.daemon.Expired {
				state = "EXPIRED"
			}
			say(w, "  cached by the running relay: id %s, mode %s, fetched %s (%s)\n", c.daemon.ID, c.daemon.Mode,
				c.daemon.Fetched.UTC().Format(time.RFC3339), state)
		case c.daemonNote != "":
			say(w, "  cached by the running relay: %s\n", c.daemonNote)
		}
	}

	say(w, "\nRoute:\n")
	if nh := r.NextHop; nh.Route != "" {
		say(w, "  %s: next hop %s", nh.Route, nh.String())
		if nh.ImplicitTLS {
			fmt.Fprint(w, " (implicit TLS)")
		}
		if nh.PolicyDomain != "" {
			say(w, ", policy domain %s", nh.PolicyDomain)
		} else {
			fmt.Fprint(w, ", no policy domain (an address)")
		}
		if l := nh.TLSLevel(); l != "" {
			say(w, ", tls %s", l)
		}
		if nh.HasAuth() {
			fmt.Fprint(w, ", with AUTH")
		}
		fmt.Fprintln(w)
	}
	switch {
	case r.Status != nil:
		say(w, "  %s\n", r.Status)
	case r.Implicit:
		say(w, "  no MX records: mail goes to %s itself (implicit MX, RFC 5321 §5.1)\n", c.Domain)
	}
	for i, h := range r.Hosts {
		say(w, "  MX %d %s", h.MX.Preference, h.MX.Name)
		if len(h.MX.CNAMEs) > 0 {
			say(w, " (CNAME: %s)", strings.Join(append([]string{h.MX.Name}, h.MX.CNAMEs...), " -> "))
		}
		fmt.Fprintln(w)
		if len(h.Addrs) > 0 {
			var as []string
			for _, a := range h.Addrs {
				as = append(as, a.String())
			}
			say(w, "      addresses: %s\n", strings.Join(as, " "))
		}
		say(w, "      requires: %s\n", requirementWords(h.Requirement, h.MX.Name))
		for _, f := range h.Failures {
			say(w, "      tried: %s\n", f)
		}
		if s := h.Session; s != nil {
			say(w, "      connected: %s, greeting %s, offers %s\n", s.Addr, s.Greeting, strings.Join(s.Extensions, " "))
			if s.TLS != nil {
				say(w, "      TLS: %s, %s\n", tls.VersionName(s.TLS.Version), tls.CipherSuiteName(s.TLS.CipherSuite))
			}
			if cert := s.Certificate(); cert != nil {
				say(w, "      certificate: %s, issued by %s, expires %s\n", strings.Join(cert.DNSNames, " "),
					cert.Issuer.CommonName, cert.NotAfter.UTC().Format(time.RFC3339))
			}
		} else if len(h.PeerCertificates) > 0 {
			cert := h.PeerCertificates[0]
			say(w, "      certificate (refused): %s, issued by %s, expires %s\n", strings.Join(cert.DNSNames, " "),
				cert.Issuer.CommonName, cert.NotAfter.UTC().Format(time.RFC3339))
		}
		if i < len(c.dane) && c.dane[i] != nil {
			writeDANE(w, c.dane[i], c.daneLive[i])
		}
		say(w, "      verdict: %s\n", c.verdicts[i])
	}

	if len(c.advice) > 0 {
		say(w, "\nAdvice for the domain owner:\n")
		for _, a := range c.advice {
			say(w, "  - %s\n", a)
		}
	}
	say(w, "\nOutcome: %s\n", outcomeWords(r))
}

// outcomeWords is the last line: what a message would get now.
func outcomeWords(r *delivery.Report) string {
	switch st := r.Outcome; {
	case st.Code == 0:
		return "not known without connecting; each host's requirement is listed above"
	case st.Delivered():
		return st.Text
	case st.Permanent():
		return "would fail: " + st.String()
	default:
		return "would defer: " + st.String()
	}
}

// checkJSON is the stable shape of `stsrelay check -json`; README documents
// it. Fields are only ever added.
type checkJSON struct {
	Domain  string      `json:"domain"`
	Route   checkRoute  `json:"route"`
	MTASTS  *checkSTS   `json:"mta_sts"`
	Hosts   []checkHost `json:"hosts"`
	Outcome *statusJSON `json:"outcome"` // null when only connecting can tell
	Verdict string      `json:"verdict"`
	Advice  []string    `json:"advice"`
	Exit    int         `json:"exit"`
}

type statusJSON struct {
	Code     int    `json:"code"`
	Enhanced string `json:"enhanced"`
	Text     string `json:"text"`
}

type checkRoute struct {
	Name         string      `json:"name,omitempty"` // "delivery.route[0]"; "" for MX routing
	Nexthop      string      `json:"nexthop,omitempty"`
	ImplicitTLS  bool        `json:"implicit_tls,omitempty"`
	PolicyDomain string      `json:"policy_domain"`
	TLS          string      `json:"tls,omitempty"` // the route's own tls level
	Auth         bool        `json:"auth,omitempty"`
	ImplicitMX   bool        `json:"implicit_mx"`
	Status       *statusJSON `json:"status"` // set when no host is tried
}

type checkSTS struct {
	Published   bool      `json:"published"`
	TXT         []string  `json:"txt"`
	CNAMEs      []string  `json:"cnames"`
	ID          string    `json:"id,omitempty"`
	RecordError string    `json:"record_error,omitempty"`
	FetchError  string    `json:"fetch_error,omitempty"`
	FetchResult string    `json:"fetch_result,omitempty"` // RFC 8460 result type
	Policy      *checkPol `json:"policy"`                 // in force, or null
	Relay       *checkPol `json:"relay_cache"`            // the running relay's, or null
	RelayNote   string    `json:"relay_note,omitempty"`
}

type checkPol struct {
	ID      string    `json:"id"`
	Mode    string    `json:"mode"`
	MX      []string  `json:"mx"`
	MaxAge  int64     `json:"max_age"`
	Expires time.Time `json:"expires"`
}

type checkHost struct {
	MX          string        `json:"mx"`
	Preference  uint16        `json:"preference"`
	CNAMEs      []string      `json:"cnames"`
	Final       string        `json:"final"`
	Addresses   []string      `json:"addresses"`
	Requirement checkReq      `json:"requirement"`
	NotUsed     *statusJSON   `json:"not_used"`
	Probed      bool          `json:"probed"`
	Reach       int           `json:"reach"`
	Failures    []statusJSON  `json:"failures"`
	Session     *checkSession `json:"session"`
	Verdict     string        `json:"verdict"`
	DANE        *checkDANE    `json:"dane"` // null when DANE was not looked up
}

type checkDANE struct {
	Note       string            `json:"note"`
	Steps      []checkDANEStep   `json:"steps"`
	Candidates []string          `json:"candidates"`
	Base       string            `json:"base"`
	Records    []checkDANERecord `json:"records"`
	// Live is the server's chain held against the records, or null.
	Live *checkDANELive `json:"live"`
}

type checkDANEStep struct {
	Query  string `json:"query"`
	Secure bool   `json:"secure"`
	Answer string `json:"answer,omitempty"`
}

type checkDANERecord struct {
	Record string `json:"record"` // "3 1 1 hex"
	Usable bool   `json:"usable"`
	Why    string `json:"why,omitempty"`
	// Match is the index in the server's chain of the certificate the
	// record matches (0 the leaf), -1 for none; absent without a probe.
	Match *int `json:"match,omitempty"`
}

type checkDANELive struct {
	Authenticated bool   `json:"authenticated"`
	Failure       string `json:"failure,omitempty"`
	Result        string `json:"result,omitempty"` // RFC 8460 result type
}

func daneJSON(h *dane.Host, live *dane.Verification) *checkDANE {
	d := &checkDANE{Note: h.Note, Steps: []checkDANEStep{}, Candidates: append([]string{}, h.Candidates...),
		Base: h.Base, Records: []checkDANERecord{}}
	for _, st := range h.Steps {
		d.Steps = append(d.Steps, checkDANEStep{Query: st.Query, Secure: st.Secure, Answer: st.Answer})
	}
	for i, r := range h.Records {
		cr := checkDANERecord{Record: r.String(), Usable: r.Usable, Why: r.Why}
		if live != nil {
			cr.Match = &live.Matches[i]
		}
		d.Records = append(d.Records, cr)
	}
	if live != nil {
		d.Live = &checkDANELive{Authenticated: live.Failure == nil && h.Requirement.DANE != nil}
		if live.Failure != nil {
			d.Live.Failure, d.Live.Result = live.Failure.Reason, string(live.Failure.Result)
		}
	}
	return d
}

type checkReq struct {
	TLS          string   `json:"tls"`    // may, none, encrypt, verify, dane
	Policy       string   `json:"policy"` // no-policy-found, sts, tlsa, local
	PolicyDomain string   `json:"policy_domain,omitempty"`
	Testing      bool     `json:"testing"`
	Names        []string `json:"names,omitempty"`
	ServerName   string   `json:"server_name,omitempty"`
	Skip         string   `json:"skip,omitempty"`
	Words        string   `json:"words"`
}

type checkSession struct {
	Address     string     `json:"address"`
	Greeting    string     `json:"greeting"`
	Extensions  []string   `json:"extensions"`
	TLSVersion  string     `json:"tls_version,omitempty"`
	Certificate *checkCert `json:"certificate"`
	Protection  string     `json:"protection"`
	TLSProblem  string     `json:"tls_problem,omitempty"`
}

type checkCert struct {
	DNSNames []string  `json:"dns_names"`
	Issuer   string    `json:"issuer"`
	NotAfter time.Time `json:"not_after"`
}

func statusOf(st *queue.Status) *statusJSON {
	if st == nil {
		return nil
	}
	return &statusJSON{Code: st.Code, Enhanced: st.Enhanced, Text: st.Text}
}

func (c *checkResult) json() checkJSON {
	r := c.report
	nh := r.NextHop
	out := checkJSON{Domain: c.Domain, Route: checkRoute{ImplicitMX: r.Implicit, Status: statusOf(r.Status),
		PolicyDomain: nh.PolicyDomain, TLS: nh.TLSLevel(), Auth: nh.HasAuth(), ImplicitTLS: nh.ImplicitTLS},
		Verdict: outcomeWords(r), Advice: c.advice, Exit: c.exit, Hosts: []checkHost{}}
	if out.Advice == nil {
		out.Advice = []string{}
	}
	if nh.Route != "" {
		out.Route.Name, out.Route.Nexthop = nh.Route, nh.String()
	}
	if r.Outcome.Code != 0 {
		out.Outcome = statusOf(&r.Outcome)
	}
	if i := c.inspection; i != nil {
		s := &checkSTS{Published: i.Published(), TXT: []string{}, CNAMEs: []string{}, RelayNote: c.daemonNote}
		if d := i.Discovery; d != nil {
			s.TXT = append(s.TXT, d.STS...)
			for _, cn := range d.CNAMEs {
				s.CNAMEs = append(s.CNAMEs, strings.TrimSuffix(cn, "."))
			}
		}
		if i.Record != nil {
			s.ID = i.Record.ID
		}
		if i.RecordErr != nil && s.Published {
			s.RecordError = i.RecordErr.Error()
		}
		if i.FetchErr != nil {
			s.FetchError = i.FetchErr.Error()
			var fe *sts.FetchError
			if errors.As(i.FetchErr, &fe) {
				s.FetchResult = string(fe.ResultType)
			}
		}
		if a := i.Applied; a != nil {
			s.Policy = &checkPol{ID: a.ID, Mode: string(a.Policy.Mode), MX: a.Policy.MX,
				MaxAge: int64(a.Policy.MaxAge / time.Second), Expires: a.Expires.UTC().Truncate(time.Second)}
		}
		if d := c.daemon; d != nil {
			s.Relay = &checkPol{ID: d.ID, Mode: string(d.Mode), MX: d.MX, MaxAge: d.MaxAge, Expires: d.Expires.UTC().Truncate(time.Second)}
		}
		out.MTASTS = s
	}
	for i, h := range r.Hosts {
		req := h.Requirement
		ch := checkHost{MX: h.MX.Name, Preference: h.MX.Preference, CNAMEs: append([]string{}, h.MX.CNAMEs...),
			Final: h.MX.Final, Addresses: []string{}, NotUsed: statusOf(h.NotUsed), Probed: h.Probed, Reach: h.Reach,
			Failures: []statusJSON{}, Verdict: c.verdicts[i],
			Requirement: checkReq{TLS: req.Security.String(), Policy: string(req.Source()), PolicyDomain: req.Domain(),
				Testing: req.Testing, Names: req.Names, ServerName: req.ServerName, Skip: req.Skip,
				Words: requirementWords(req, h.MX.Name)}}
		for _, a := range h.Addrs {
			ch.Addresses = append(ch.Addresses, a.String())
		}
		for _, f := range h.Failures {
			ch.Failures = append(ch.Failures, *statusOf(&f))
		}
		if s := h.Session; s != nil {
			cs := &checkSession{Address: s.Addr.String(), Greeting: s.Greeting, Extensions: s.Extensions,
				Protection: s.Protection, TLSProblem: s.TLSProblem}
			if s.TLS != nil {
				cs.TLSVersion = tls.VersionName(s.TLS.Version)
			}
			if cert := s.Certificate(); cert != nil {
				cs.Certificate = &checkCert{DNSNames: cert.DNSNames, Issuer: cert.Issuer.CommonName, NotAfter: cert.NotAfter.UTC().Truncate(time.Second)}
			}
			ch.Session = cs
		}
		if i < len(c.dane) && c.dane[i] != nil {
			ch.DANE = daneJSON(c.dane[i], c.daneLive[i])
		}
		out.Hosts = append(out.Hosts, ch)
	}
	return out
}
