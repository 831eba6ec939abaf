package delivery

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/resolve"
)

// MaxConnectionsPerAttempt bounds the connections one delivery attempt
// opens, over all MX hosts; RFC 5321 §5.1 asks for at least two
// addresses, Postfix uses 5.
const MaxConnectionsPerAttempt = 10

// share is how many connections a host may open in an attempt that has
// left of them, with after usable hosts behind it: none of those kept
// for the later hosts, one each; the last may use all that is left, and
// every host gets one (a host without any left is notTried).
func share(left, after int) int { return max(left-after, 1) }

// notTried is the failure of a host the attempt had no connection left
// for. Named, so the log shows it was never tried, and what the others
// said is not taken for its answer (aggregate).
func notTried(host string) *hostFailure {
	return &hostFailure{host: host, kind: failTransport, status: queue.Status{
		Code: 451, Enhanced: "4.4.0",
		Text: fmt.Sprintf("%s: not tried, no connection left in this attempt (at most %d)", host, MaxConnectionsPerAttempt)}}
}

// usableAfter is how many hosts after p.hops[i] an attempt for env may
// dial: it keeps a connection for each (share).
func (e *Engine) usableAfter(p *plan, i int, env queue.Envelope) int {
	n := 0
	for j := i + 1; j < len(p.hops); j++ {
		if p.hops[j].unusable == nil && e.precheck(p.hops[j].mx, p.effective(j, env), env.RequireTLS) == nil {
			n++
		}
	}
	return n
}

// attempt is what one Deliver call learns, for its log line.
type attempt struct {
	nh     NextHop
	mx     string
	ip     string
	req    policy.Requirement
	tls    string
	reused bool
	// tlsProblem is a certificate failure that testing mode let pass.
	tlsProblem string
	// state is the session's TLS, nil in plaintext.
	state *tls.ConnectionState
	// certName is the name the certificate matched at the handshake.
	certName string
	// skipped says why hosts other than the one used (or all of them)
	// were not used: the route's "record why".
	skipped []string
	// earlier says what each host that answered before the one used
	// deferred, or could not carry, whose recipients went on to the next
	// host.
	earlier []string
	// renewed says why new sessions with a host that had answered failed,
	// when recipients they were to carry ended without a later host's
	// answer.
	renewed []string
}

// Deliver attempts job and returns one Status per recipient, in order
// (queue.Deliverer). It returns when ctx is done, deferring what it could
// not finish.
func (e *Engine) Deliver(ctx context.Context, job *queue.Job) []queue.Status {
	if job == nil {
		return nil
	}
	start := time.Now()
	var at attempt
	statuses := e.deliver(ctx, job, &at)

	delivered, deferred, failed := 0, 0, 0
	for _, st := range statuses {
		switch {
		case st.Delivered():
			delivered++
		case st.Permanent():
			failed++
		default:
			deferred++
		}
	}
	label := at.req.Label()
	metricAttempts.Inc()
	metricRecipients.WithLabelValues("delivered", label).Add(float64(delivered))
	metricRecipients.WithLabelValues("deferred", label).Add(float64(deferred))
	metricRecipients.WithLabelValues("failed", label).Add(float64(failed))

	outcome, level := "delivered", slog.LevelInfo
	switch {
	case failed > 0 && delivered+deferred == 0:
		outcome, level = "failed", slog.LevelWarn
	case deferred > 0 && delivered+failed == 0:
		outcome, level = "deferred", slog.LevelWarn
	case delivered != len(statuses):
		outcome, level = "partial", slog.LevelWarn
	}
	tlsVersion := at.tls
	if tlsVersion == "" {
		tlsVersion = "none"
	}
	var status string
	if len(statuses) > 0 {
		status = statuses[0].String()
		for _, st := range statuses {
			if !st.Delivered() {
				status = st.String()
				break
			}
		}
	}
	attrs := []slog.Attr{
		slog.String("id", job.ID),
		slog.String("message_id", job.Envelope.MessageID),
		slog.String("domain", job.Domain),
		slog.String("outcome", outcome),
		slog.Int("delivered", delivered), slog.Int("deferred", deferred), slog.Int("failed", failed),
		slog.String("mx", at.mx), slog.String("ip", at.ip),
		slog.String("policy", label),
		slog.String("tls", tlsVersion),
		slog.Bool("reused", at.reused),
		slog.Duration("took", time.Since(start).Round(time.Millisecond)),
		slog.String("status", status),
	}
	if at.state != nil {
		// The words an operator greps for, as check prints them and as
		// Postfix's "Verified TLS connection established": "verified TLS,
		// MTA-STS enforce", and the name the certificate matched.
		attrs = append(attrs, slog.String("tls_auth", protection(at.req, at.state, at.tlsProblem)))
		if name := verifiedName(&at); name != "" {
			attrs = append(attrs, slog.String("cert_name", name))
		}
		if at.state.DidResume {
			// The connection's handshake resumed an earlier session.
			attrs = append(attrs, slog.Bool("tls_resumed", true))
		}
	}
	if at.tlsProblem != "" {
		attrs = append(attrs, slog.String("tls_problem", at.tlsProblem))
	}
	if len(at.earlier) > 0 {
		attrs = append(attrs, slog.String("earlier_hosts", strings.Join(at.earlier, "; ")))
	}
	if len(at.skipped) > 0 {
		attrs = append(attrs, slog.String("hosts_not_used", strings.Join(at.skipped, "; ")))
	}
	if len(at.renewed) > 0 {
		attrs = append(attrs, slog.String("new_session_failed", strings.Join(at.renewed, "; ")))
	}
	if at.nh.Route != "" {
		// Where the route sent it; never its credentials.
		attrs = append(attrs, slog.String("route", at.nh.Route), slog.String("nexthop", at.nh.String()))
	}
	e.log.LogAttrs(ctx, level, "delivery attempt", attrs...)
	return statuses
}

// verifiedName is the name the certificate of a verified session matched,
// "" when the session's certificate was not verified. The handshake found
// it (authenticate); a reused connection was opened under the same
// requirement (connKey), so its name holds for every message it carries.
func verifiedName(at *attempt) string {
	if at.req.Security != policy.SecurityVerify || at.req.Skip != "" || at.tlsProblem != "" || len(at.state.PeerCertificates) == 0 {
		return ""
	}
	return at.certName
}

func (e *Engine) deliver(ctx context.Context, job *queue.Job, at *attempt) []queue.Status {
	if len(job.Recipients) == 0 {
		return nil
	}
	domain := canonicalDomain(job.Domain)
	all := func(st queue.Status) []queue.Status {
		out := make([]queue.Status, len(job.Recipients))
		for i := range out {
			out[i] = st
		}
		return out
	}
	if ctx.Err() != nil {
		return all(queue.Status{Code: 451, Enhanced: "4.4.2", Text: "delivery interrupted before it started: " + context.Cause(ctx).Error()})
	}

	nh := e.nexthop(domain, job.Envelope.From)
	at.nh = nh
	p := e.plan(ctx, nh)
	if p.status != nil {
		return all(*p.status)
	}

	if job.Open == nil {
		return all(queue.Status{Code: 451, Enhanced: "4.3.0", Text: "queue job " + job.ID + " has no message to open"})
	}
	rc, err := job.Open()
	if err != nil {
		return all(queue.Status{Code: 451, Enhanced: "4.3.0", Text: "reading the queued message: " + err.Error()})
	}
	body := &message{open: job.Open, rc: rc}
	defer body.Close()

	env := job.Envelope
	var fails []*hostFailure
	budget := MaxConnectionsPerAttempt
	stale := 0
	rated := -1 // the host whose rate limit the message has passed
	// out is what the hosts that answered said, recipient by recipient.
	// A recipient a host deferred goes to the next host of the plan in
	// the same attempt, as Postfix does with a soft error from a host that
	// is not the last: a primary that answers 452 for days must not keep
	// the mail from a healthy backup until it expires. todo are the
	// recipients for the next host, idx their places in job.
	var out []queue.Status
	todo, idx := job, make([]int, len(job.Recipients))
	for k := range idx {
		idx[k] = k
	}
	var answered attempt // at as it was when out last changed
	var deferral string  // what the host that last answered deferred, or did not send
	given := 0           // how many recipients that host was given
	// onward gives the recipients the host that last answered deferred,
	// and those its sessions could not carry (unsent), to the host after
	// it; false when there are none.
	onward := func(deferred, unsent []int) bool {
		var says []string
		if len(deferred) > 0 {
			slices.Sort(deferred)
			says = append(says, fmt.Sprintf("%s (%d of %d recipients)", out[deferred[0]].Text, len(deferred), given))
		}
		if len(unsent) > 0 {
			says = append(says, fmt.Sprintf("%s (%d of %d recipients not sent)", out[unsent[0]].Text, len(unsent), given))
		}
		if len(says) == 0 {
			return false
		}
		next := slices.Concat(deferred, unsent)
		slices.Sort(next)
		deferral = strings.Join(says, "; ")
		todo, idx = recipients(job, next), next
		return true
	}
	// A session that reached its transaction limit (transactionLimit)
	// with recipients not yet sent leaves them to a new session with the
	// same host: resume is that host's
	// place in p.hops (-1: none), held what it deferred meanwhile, which
	// goes on to the next host with whatever the new session defers.
	resume := -1
	var held []int
	// noSession gives the recipients a new session was to carry st.
	noSession := func(st queue.Status) {
		for _, k := range idx {
			out[k] = st
		}
	}
	// A recipient's status is what the last host that answered for it
	// said: spoke[k], nil before one has. A new session that fails
	// answers for none of the recipients it was to carry; they get its
	// status, refusal[k], and since[k] is where in fails the failures
	// they went on from begin (-1: none since a host last answered for
	// them). Unless a later host answers for them, they end with spoke[k]
	// or, without one, with what every host from there on said
	// (aggregate), as a fresh attempt to those hosts would.
	n := len(job.Recipients)
	spoke, refusal, since := make([]*queue.Status, n), make([]queue.Status, n), make([]int, n)
	for k := range since {
		since[k] = -1
	}
	// again are the failures of new sessions: the host was used, so
	// they are not for hosts_not_used.
	again := map[*hostFailure]bool{}
	sessionFailed := func(st queue.Status, mark int) {
		noSession(st)
		for _, k := range idx {
			refusal[k] = st
			if since[k] < 0 {
				since[k] = mark
			}
		}
	}
	usableAfter := func(i int) int { return e.usableAfter(&p, i, env) }
	for i := 0; i < len(p.hops); i++ {
		if ctx.Err() != nil {
			// Cut off (a stop, or an operator's bounce, delete or hold): no
			// new session, with this host or the next. What the hosts
			// answered stands; the recipients a new session with the same
			// host was to carry get the cut's status.
			cause := context.Cause(ctx)
			if resume == i {
				noSession(transportFailure(ctx, p.hops[i].mx.Name, "before a new session", cause).status)
			} else {
				fails = append(fails, transportFailure(ctx, p.hops[i].mx.Name, "before connecting", cause))
			}
			break
		}
		if resume >= 0 && i != resume {
			// The host got no new session: what it was to take goes on
			// with what it deferred.
			onward(held, idx)
			resume, held = -1, nil
		}
		h := p.hops[i]
		if h.unusable != nil {
			fails = append(fails, h.unusable)
			continue
		}
		req := p.effective(i, env)
		at.mx, at.req = h.mx.Name, req
		if f := e.precheck(h.mx, req, env.RequireTLS); f != nil {
			e.recordPrecheck(nh.PolicyDomain, h.mx, req)
			fails = append(fails, f)
			continue
		}
		if budget <= 0 {
			fails = append(fails, notTried(h.mx.Name))
			continue
		}
		if i != rated {
			// A message takes one token of the destination's rate
			// however many sessions it needs with the host: a new one
			// for the rest of it, or another after a stale idle one.
			if err := e.waitRate(ctx, h); err != nil {
				fails = append(fails, transportFailure(ctx, h.mx.Name, "waiting for the destination's rate limit", err))
				break
			}
			rated = i
		}
		spare := share(budget, usableAfter(i))
		unspent := spare
		s, fs := e.connect(ctx, nh, h, req, env.RequireTLS, &unspent)
		budget -= spare - unspent
		if s != nil {
			// The host answered: its addresses that did not are no
			// answer for the message (check shows them).
			fs = nil
		}
		mark := len(fails)
		fails = append(fails, fs...)
		if i == resume {
			for _, f := range fs {
				again[f] = true
			}
			if s == nil && len(fs) > 0 {
				// The rest say why they got no new session, not only
				// that the last one reached its limit.
				sessionFailed(aggregate(nh, fs), mark)
			}
		}
		stop := false
		for _, f := range fs {
			if f.throttle {
				e.throttle(h, job, f.status.Text)
			}
			// One refused password per attempt, not one per host, spares
			// the account a lockout.
			stop = stop || f.stop
		}
		if stop {
			break
		}
		if s == nil {
			if ctx.Err() != nil {
				break
			}
			continue
		}
		at.ip, at.reused, at.tls = s.addr.String(), s.reused, ""
		if s.tls != nil {
			at.tls = tlsVersionName(s.tls.Version)
		}
		at.tlsProblem, at.state, at.certName = s.tlsProblem, s.tls, s.certName
		statuses, final, unsent, f := e.transact(ctx, s, todo, body)
		if s.throttled != "" {
			e.throttle(h, job, s.throttled)
		}
		if f != nil && f.stale && stale < maxStaleRetries {
			// Nothing of the message went out: the same host again, on
			// another idle connection or a new one.
			e.release(s)
			stale++
			i--
			continue
		}
		if f != nil {
			// The host lacks what this message needs; another may have it.
			fails = append(fails, f)
			if i == resume {
				again[f] = true
				sessionFailed(f.status, len(fails)-1)
			}
			e.release(s)
			continue
		}
		e.release(s)
		if out == nil {
			out = make([]queue.Status, len(job.Recipients))
		}
		for j, k := range idx {
			out[k] = statuses[j]
		}
		earlier := answered.earlier
		if i != resume {
			// A host's first session: the host before it deferred what
			// came here.
			if deferral != "" {
				earlier = append(earlier, deferral)
			}
			deferral, given = "", len(idx)
		}
		answered = *at
		answered.earlier = earlier
		var rest []int
		var left []bool // left[j]: recipient j is in rest
		if len(unsent) > 0 {
			left = make([]bool, len(idx))
			for _, j := range unsent {
				left[j] = true
				rest = append(rest, idx[j])
			}
		}
		for j, k := range idx {
			if left == nil || !left[j] {
				spoke[k], since[k] = &statuses[j], -1
			}
		}
		next := held
		for j, k := range idx {
			// A 4xx reply means the host did not take the message
			// (RFC 5321 §4.2.1); one that is final stands.
			if st := statuses[j]; (left == nil || !left[j]) && !st.Delivered() && !st.Permanent() && !final[j] {
				next = append(next, k)
			}
		}
		resume, held = -1, nil
		if len(rest) > 0 && len(rest) < len(idx) && budget > usableAfter(i) {
			// The session carried some and no more may go on it: the
			// rest go in a new session with this host, taken from the
			// idle cache or opened (and counted in budget). Not with
			// the connections the hosts after it need: a host whose
			// sessions carry one transaction each would spend them all,
			// and what it deferred would never reach the next.
			resume, held = i, next
			todo, idx = recipients(job, rest), rest
			i--
			continue
		}
		if !onward(next, rest) {
			break
		}
	}
	if out != nil {
		first := len(fails) // where the failures the rest end on begin
		for k, from := range since {
			if from < 0 || out[k] != refusal[k] {
				// A host answered for it since, or the cut's status
				// stands.
				continue
			}
			first = min(first, from)
			// What the refusal said alone may be a 5xx (a 554 greeting)
			// where a fresh attempt to the same hosts would defer,
			// because another was merely unreachable.
			if spoke[k] != nil {
				out[k] = *spoke[k]
			} else {
				// No host ever answered for it: every failure, those
				// of the hosts before the refused session too, is what
				// a fresh attempt would meet.
				out[k] = aggregate(nh, fails)
			}
		}
		// A new session's failure is in earlier_hosts when a later host
		// answered for its recipients, in new_session_failed when they
		// end on it.
		var skipped, renewed []*hostFailure
		for j, f := range fails {
			switch {
			case !again[f]:
				skipped = append(skipped, f)
			case j >= first:
				renewed = append(renewed, f)
			}
		}
		*at = answered
		at.skipped, at.renewed = texts(skipped), texts(renewed)
		return out
	}
	// No host answered: the log line names none (mx=, ip= and tls= speak
	// of the host used), rather than the last one considered, which may
	// never have been dialled; hosts_not_used says what each one did.
	*at = attempt{nh: at.nh, req: at.req, skipped: texts(fails)}
	return all(aggregate(nh, fails))
}

// recipients is job for the recipients at idx alone.
func recipients(job *queue.Job, idx []int) *queue.Job {
	j := *job
	j.Recipients = make([]queue.RecipientParams, len(idx))
	for n, k := range idx {
		j.Recipients[n] = job.Recipients[k]
	}
	return &j
}

// message is the queued message as each transaction reads it: from its
// first byte. One that went nowhere may have read it (BDAT reads it
// before the group goes out, and the group met a stale connection); the
// next opens it again (Job.Open may be called again).
type message struct {
	open func() (io.ReadCloser, error)
	rc   io.ReadCloser
	read bool
}

func (m *message) Read(p []byte) (int, error) {
	m.read = true
	return m.rc.Read(p)
}

// rewind makes the next Read start at the first byte.
func (m *message) rewind() error {
	if !m.read {
		return nil
	}
	m.rc.Close()
	rc, err := m.open()
	if err != nil {
		m.rc = io.NopCloser(strings.NewReader(""))
		return err
	}
	m.rc, m.read = rc, false
	return nil
}

func (m *message) Close() error { return m.rc.Close() }

// maxSevenBitDSN bounds the DSN read into memory to be re-encoded (some
// five times its size while that runs). A DSN returns a message whole
// only up to delivery.bounce_size_limit, 10 MB unless set higher.
const maxSevenBitDSN = 64 << 20

// errQueueRead is a queued message that could not be read.
var errQueueRead = errors.New("reading the queued message")

// sevenBitDSN returns job and its body re-encoded for a host without
// 8BITMIME (queue.SevenBitDSN).
func sevenBitDSN(job *queue.Job, body *message) (*queue.Job, *message, error) {
	if job.Size > maxSevenBitDSN {
		return nil, nil, fmt.Errorf("%d bytes, larger than %d", job.Size, maxSevenBitDSN)
	}
	if err := body.rewind(); err != nil {
		return nil, nil, fmt.Errorf("%w: %w", errQueueRead, err)
	}
	dsn, err := io.ReadAll(io.LimitReader(body, maxSevenBitDSN+1))
	if err != nil {
		return nil, nil, fmt.Errorf("%w: %w", errQueueRead, err)
	}
	if int64(len(dsn)) > maxSevenBitDSN {
		return nil, nil, fmt.Errorf("larger than %d bytes", maxSevenBitDSN)
	}
	seven, err := queue.SevenBitDSN(dsn)
	if err != nil {
		return nil, nil, err
	}
	j := *job
	j.Size = int64(len(seven))
	j.Envelope.Body8Bit = false
	open := func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(seven)), nil }
	rc, _ := open()
	return &j, &message{open: open, rc: rc}, nil
}

// requirements asks the policy.PolicySource about the usable hosts of nh,
// for its policy domain (RFC 8461 §3.4: a smart host's own domain), and
// applies the local override: the route's tls, else [[delivery.policy]].
func (e *Engine) requirements(ctx context.Context, nh NextHop, hops []hop) (reqs, locals []policy.Requirement, _ *queue.Status) {
	domain := nh.PolicyDomain
	reqs = make([]policy.Requirement, len(hops))
	var mxs []policy.MX
	var idx []int
	for i, h := range hops {
		if h.unusable == nil && !h.literal {
			mxs = append(mxs, h.mx)
			idx = append(idx, i)
		}
	}
	if e.opts.Policy != nil && len(mxs) > 0 && domain != "" {
		got, err := e.opts.Policy.Requirements(ctx, domain, mxs)
		if err != nil {
			var pe *policy.Error
			var re *resolve.Error
			switch {
			case errors.As(err, &pe):
				return nil, nil, &queue.Status{Code: pe.Code, Enhanced: pe.Enhanced, Text: pe.Text}
			case errors.As(err, &re):
				return nil, nil, &queue.Status{Code: 451, Enhanced: "4.4.3", Text: "TLS policy lookup: " + err.Error()}
			}
			return nil, nil, &queue.Status{Code: 451, Enhanced: "4.7.0", Text: fmt.Sprintf("TLS policy lookup for %s: %v", domain, err)}
		}
		if len(got) != len(mxs) {
			return nil, nil, &queue.Status{Code: 451, Enhanced: "4.3.0",
				Text: fmt.Sprintf("TLS policy lookup for %s: %d requirements for %d MX hosts", domain, len(got), len(mxs))}
		}
		for j, i := range idx {
			reqs[i] = got[j]
		}
	}
	for i, h := range hops {
		reqs[i].MXValidated = reqs[i].MXValidated || h.validated
	}
	if o, ok := e.localOverride(nh); ok {
		if !o.published {
			locals = make([]policy.Requirement, len(hops))
		}
		for i := range reqs {
			if locals != nil {
				locals[i] = o.apply(policy.Requirement{MXValidated: reqs[i].MXValidated}, hops[i].mx)
			}
			reqs[i] = o.apply(reqs[i], hops[i].mx)
		}
	}
	return reqs, locals, nil
}

// precheck rejects a host before dialing when its requirement already
// rules it out.
func (e *Engine) precheck(mx policy.MX, req policy.Requirement, requireTLS bool) *hostFailure {
	// RFC 8461 §5: under testing a Skip is reported, not enforced; the
	// session records it as its result. A REQUIRETLS message still needs
	// the host validated, which a Skip says it is not (checked below).
	if req.Excluded() {
		return e.policyFailure(mx.Name, mx, req, requireTLS, req.Skip)
	}
	if req.Security == policy.SecurityDANE && req.DANE == nil && !req.Testing {
		// Nothing can authenticate this host by TLSA (dane-only without
		// usable records); sending unauthenticated is worse than waiting.
		return e.policyFailure(mx.Name, mx, req, requireTLS, "DANE required but no usable TLSA records")
	}
	if requireTLS {
		// RFC 8689 §4.2.1: the MX name must be authenticated, by DNSSEC or
		// by an MTA-STS policy, and TLS must be possible.
		if !req.MXValidated {
			return requireTLSFailure(mx.Name, "MX host not validated by DNSSEC or MTA-STS")
		}
		if req.Security == policy.SecurityNone {
			return requireTLSFailure(mx.Name, "local policy forbids TLS to this host")
		}
	}
	return nil
}

// recordPrecheck records the session result of a host that precheck ruled
// out before dialing, as delivery (not Check) counts them.
func (e *Engine) recordPrecheck(domain string, mx policy.MX, req policy.Requirement) {
	switch {
	case req.Excluded():
		e.record(req, policy.SessionResult{PolicyDomain: domain, Policy: req.Policy, MX: mx.Name,
			Result: req.SkipResultType(), Detail: req.Skip, Unreported: req.Unreported})
	case req.Security == policy.SecurityDANE && req.DANE == nil && !req.Testing:
		// RFC 8460 §4.3.2.1: dane-required, under the TLSA policy if there
		// is one, else as no policy found (a local policy is not reported).
		r := policy.SessionResult{PolicyDomain: domain, MX: mx.Name, Result: policy.ResultDANERequired,
			Detail: "DANE required by local policy; no usable DNSSEC-validated TLSA records", Unreported: req.Unreported}
		if req.Source() == policy.TypeTLSA {
			r.Policy = req.Policy
		}
		e.record(req, r)
	}
}

// connect returns a ready session to one of h's addresses: an idle one
// when there is one, else a new connection. The failures are those of
// the addresses dialed before it, or of all that were.
func (e *Engine) connect(ctx context.Context, nh NextHop, h hop, req policy.Requirement, requireTLS bool, budget *int) (*session, []*hostFailure) {
	// An idle connection serves only if it is what a new one would be:
	// one that ended in plaintext never carries a message that needs TLS.
	for _, withTLS := range []bool{true, false} {
		if !withTLS && (req.MustTLS() || requireTLS || nh.auth != nil) {
			break
		}
		key := keyFor(nh, h.mx, req, withTLS)
		for s := e.takeIdle(ctx, key); s != nil; s = e.takeIdle(ctx, key) {
			if ok, _ := s.client.Extension("PIPELINING"); ok {
				// RFC 2920 §3.1: RSET may lead a command group, so the
				// check that the connection is still alive costs no
				// round trip of its own (transact; a stale one is
				// retried on another connection).
				s.reused, s.probe = true, true
				return s, nil
			}
			if s.reset(ctx) {
				s.reused = true
				return s, nil
			}
			s.close()
			e.releaseSlot(s.shapeKey)
		}
	}
	var fails []*hostFailure
	for _, addr := range h.addrs {
		if *budget <= 0 {
			break
		}
		if ctx.Err() != nil {
			// Cut off: no new connection either.
			fails = append(fails, transportFailure(ctx, h.mx.Name, "connecting", context.Cause(ctx)))
			break
		}
		*budget--
		if err := e.acquireSlot(ctx, h); err != nil {
			fails = append(fails, transportFailure(ctx, h.mx.Name, "waiting for a free connection slot", err))
			break
		}
		r := e.open(ctx, nh, h, addr, req, requireTLS, false)
		if r.retryPlain {
			// Security level may: a broken TLS stack should not stop mail
			// that could go in plaintext; retry this address once, as
			// Postfix does. Never when TLS is required (checked in open).
			r = e.open(ctx, nh, h, addr, req, requireTLS, true)
		}
		if r.s != nil {
			if r.s.tls != nil {
				metricSessions.WithLabelValues("yes").Inc()
			} else {
				metricSessions.WithLabelValues("no").Inc()
			}
			return r.s, fails
		}
		e.releaseSlot(h.key)
		fails = append(fails, r.fail)
		metricHostFailures.WithLabelValues(r.fail.kind.String()).Inc()
		if r.fail.nextHost && r.fail.kind == failTransport && r.fail.status.Reply != "" {
			// The host refused the session in its own words (greeting
			// or EHLO). The addresses that did not answer before it
			// say nothing about the host: what it said decides, as it
			// does when the refusing address comes first.
			for _, f := range fails[:len(fails)-1] {
				f.spokenFor = f.kind == failTransport && f.status.Reply == ""
			}
		}
		if r.fail.nextHost || ctx.Err() != nil {
			break
		}
	}
	return nil, fails
}

// transact sends the message over s: MAIL, RCPT for each recipient, DATA,
// in as many transactions as the remote's recipient limit asks for. It
// returns the per-recipient statuses and which of them are final (see
// txn.final), or a hostFailure when the host cannot take this message at
// all (before MAIL), so the next may. unsent are the recipients (their
// places in job) that no transaction carried because the session reached
// its transaction limit: they are for a new session.
func (e *Engine) transact(ctx context.Context, s *session, job *queue.Job, body *message) (statuses []queue.Status, final []bool, unsent []int, f *hostFailure) {
	if ctx.Err() != nil {
		// Cut off since connect: the session goes back unused (release).
		return nil, nil, nil, transportFailure(ctx, s.label, "before MAIL", context.Cause(ctx))
	}
	raw := s.conn.Conn
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	defer func() {
		if !stop() {
			s.broken = true
		}
	}()
	env := job.Envelope
	s.throttled = ""

	needUTF8 := env.SMTPUTF8 || !isASCII(env.From)
	for _, r := range job.Recipients {
		needUTF8 = needUTF8 || !isASCII(r.Addr)
	}
	if env.RequireTLS {
		// RFC 8689 §4.2.1: PKIX (MX host name) or DANE, and REQUIRETLS
		// offered after STARTTLS.
		switch ok, _ := s.client.Extension("REQUIRETLS"); {
		case s.tls == nil:
			return nil, nil, nil, requireTLSFailure(s.label, "no TLS")
		case !s.authenticatedMX():
			return nil, nil, nil, requireTLSFailure(s.label, "certificate not valid for the MX host name")
		case !ok:
			return nil, nil, nil, requireTLSFailure(s.label, "REQUIRETLS not supported")
		}
	}
	if ok, _ := s.client.Extension("SMTPUTF8"); needUTF8 && !ok {
		// RFC 6531 §3.4: such a message cannot be downgraded here.
		return nil, nil, nil, &hostFailure{host: s.label, kind: failUTF8, nextHost: true, status: queue.Status{
			Code: 550, Enhanced: "5.6.7", RemoteMTA: s.mx.Name,
			Text: s.label + ": SMTPUTF8 not supported, and this message needs it (RFC 6531)"}}
	}
	if ok, _ := s.client.Extension("8BITMIME"); env.Body8Bit && !ok {
		// RFC 6152 §3: 8-bit data must not go to a server without
		// 8BITMIME. stsrelay does not rewrite messages (package doc): the
		// next host may take it, else the message returns with 5.6.3.
		// Our own DSNs are the exception: a DSN cannot return, so it goes
		// re-encoded.
		why := ""
		if env.OwnDSN {
			j, b, err := sevenBitDSN(job, body)
			switch {
			case errors.Is(err, errQueueRead):
				// The disk's trouble, not the DSN's: as when the
				// message is read to be sent, it waits for a retry.
				n := len(job.Recipients)
				statuses, final = make([]queue.Status, n), make([]bool, n)
				for k := range statuses {
					statuses[k] = queue.Status{Code: 451, Enhanced: "4.3.0", Text: err.Error()}
					final[k] = true
				}
				return statuses, final, nil, nil
			case err != nil:
				why = "; re-encoding this DSN failed: " + err.Error()
			default:
				job, body, env = j, b, j.Envelope
			}
		}
		if env.Body8Bit {
			return nil, nil, nil, &hostFailure{host: s.label, kind: failEightBit, nextHost: true, status: queue.Status{
				Code: 550, Enhanced: "5.6.3",
				Text: s.label + ": 8BITMIME not supported, and this message has 8-bit content (RFC 6152)" + why}}
		}
	}
	if ok, limit := s.client.Extension("SIZE"); ok {
		// RFC 1870 §6.1: a message larger than the fixed limit the
		// server declared is not sent (its body would cross the wire to
		// be refused); the next host may take it, else it returns with
		// 5.3.4. A limit of 0, or none, declares no limit.
		if n, err := strconv.ParseInt(strings.TrimSpace(limit), 10, 64); err == nil && n > 0 && job.Size > n {
			return nil, nil, nil, &hostFailure{host: s.label, kind: failSize, nextHost: true, status: queue.Status{
				Code: 552, Enhanced: "5.3.4", RemoteMTA: s.mx.Name,
				Text: fmt.Sprintf("%s: message of %d bytes is larger than the host's limit of %d (SIZE, RFC 1870)", s.label, job.Size, n)}}
		}
	}
	dsn, _ := s.client.Extension("DSN")

	// go-smtp adds BODY=8BITMIME whenever the remote offers it, which
	// RFC 6152 allows for 7-bit content too.
	mo := &smtp.MailOptions{Size: job.Size, RequireTLS: env.RequireTLS, UTF8: needUTF8, EnvelopeID: env.EnvID}
	switch strings.ToUpper(env.Ret) {
	case "FULL":
		mo.Return = smtp.DSNReturnFull
	case "HDRS":
		mo.Return = smtp.DSNReturnHeaders
	}
	if !isPrintableASCII(mo.EnvelopeID) {
		mo.EnvelopeID = ""
	}

	// One transaction, or more: RFC 9422 §4.2 has the client send at most
	// RCPTMAX recipients in each, and after a 452 at the remote's
	// recipient limit the rest go in another (RFC 5321 §4.5.3.1.10),
	// on this connection rather than on the retry schedule, as long as
	// the session may carry another transaction.
	n := len(job.Recipients)
	out := make([]queue.Status, n)
	final = make([]bool, n)
	todo := make([]int, n)
	for i := range todo {
		todo[i] = i
	}
	limit := s.limits.rcptMax
	for first := true; len(todo) > 0; first = false {
		if most, mailMax := s.transactionLimit(); most > 0 && s.messages >= most {
			// No MAIL beyond the limit: the rest go in a new session
			// (deliver). RFC 3463 X.5.3 is this very case, "the
			// remainder of the recipients to be delivered on a
			// subsequent delivery attempt".
			what := fmt.Sprintf("max_messages_per_connection of %d transactions", most)
			if mailMax {
				what = fmt.Sprintf("the remote's MAILMAX of %d transactions per session", most)
			}
			st := queue.Status{Code: 452, Enhanced: "4.5.3", Text: s.label + ": " + what + " was reached; the rest go in a new session"}
			for _, k := range todo {
				out[k] = st
			}
			unsent = slices.Clone(todo) // todo stays on the stack
			break
		}
		batch := todo
		if limit > 0 && len(batch) > limit {
			batch = batch[:limit]
		}
		if !first {
			// RSET leaves no doubt about where the last transaction ended.
			if err := s.rset(); err != nil {
				s.broken = true
				st := s.commandFailure(ctx, "after RSET", err, false).status
				for _, k := range todo {
					out[k] = st
				}
				break
			}
		}
		if err := body.rewind(); err != nil {
			st := queue.Status{Code: 451, Enhanced: "4.3.0", Text: "reading the queued message: " + err.Error()}
			for _, k := range todo {
				out[k], final[k] = st, true
			}
			break
		}
		x := &txn{ctx: ctx, s: s, job: recipients(job, batch), dsn: dsn,
			out: make([]queue.Status, len(batch)), final: make([]bool, len(batch))}
		// Every MAIL counts, whatever its reply: MAILMAX (RFC 9422
		// §4.1) limits the MAIL commands of a session.
		s.messages++
		x.run(mo, body)
		if x.stale {
			// Only the first transaction leads with RSET (connect).
			s.broken = true
			return nil, nil, nil, &hostFailure{host: s.label, kind: failTransport, stale: true,
				status: queue.Status{Code: 451, Enhanced: "4.4.2", Text: s.label + ": an idle connection did not answer RSET"}}
		}
		took := false
		for j, k := range batch {
			out[k], final[k] = x.out[j], x.final[j]
			took = took || x.out[j].Delivered()
		}
		var again []int
		if took {
			// The remote took some before its limit, so another
			// transaction takes some more of the rest.
			again = x.overLimit
		}
		rest := todo[len(batch):]
		ended := x.ended
		if !took && slices.Contains(x.overLimit, 0) {
			// The remote refused the first recipient at its limit: it
			// counts more than this transaction (a session's or a
			// day's recipients), and no transaction of this session
			// takes any. That ends the session's part as below, and
			// the connection is not kept.
			s.refusesRecipients = true
			ended = &x.out[0]
		}
		if ended != nil || s.broken || s.conn == nil || ctx.Err() != nil {
			// What ended this transaction ends the session's part in the
			// message: the recipients not yet sent get its status, as
			// they would have in one transaction; those over the limit
			// keep their 452.
			st := ended
			if st == nil {
				st = &transportFailure(ctx, s.label, "before these recipients were sent", net.ErrClosed).status
			}
			for _, k := range rest {
				out[k] = *st
			}
			break
		}
		todo = make([]int, 0, len(again)+len(rest))
		for _, j := range again {
			todo = append(todo, batch[j])
		}
		todo = append(todo, rest...)
	}
	return out, final, unsent, nil
}

// run is one mail transaction, pipelined or lock-step.
func (x *txn) run(mo *smtp.MailOptions, body io.Reader) {
	s := x.s
	if ok, _ := s.client.Extension("PIPELINING"); ok {
		// RFC 2920: one round trip for the envelope instead of one per
		// command. A command go-smtp would refuse to write (a line break
		// in an address) takes the lock-step path, which says why; so
		// does a group too large to be written without reading.
		if group, err := envelopeCommands(s.client.Extension, x.job.Envelope.From, mo, x.job.Recipients); err == nil && groupFits(group) {
			if x.pipelinedOrChunked(group, body) != nil || x.stale {
				return
			}
		}
	}
	if s.probe {
		s.probe = false
		if err := s.rset(); err != nil {
			if x.ctx.Err() != nil {
				// The cut closed it: the attempt ends here.
				x.fail("after RSET", err)
				return
			}
			x.stale = true
			return
		}
	}
	x.lockStep(mo, body)
}

// maxStaleRetries bounds how many idle connections one attempt tries
// after one turned out stale, before it counts as a failed host.
const maxStaleRetries = 3

// txn is one mail transaction's outcome, recipient by recipient, shared
// by the lock-step and the pipelined path so both map replies alike.
type txn struct {
	ctx context.Context
	s   *session
	job *queue.Job
	dsn bool // the remote offers DSN
	out []queue.Status
	// accepted are the recipients the remote took with RCPT; their 250
	// in out is provisional until the end of DATA.
	accepted []int
	// stale says the RSET that led the group found the connection
	// closed or unwilling; nothing else of the group counts.
	stale bool
	// sent says the whole message is out, the final dot or the BDAT
	// chunk: a reply lost from here leaves the outcome unknown.
	sent bool
	// final marks the statuses no other host may change in this attempt:
	// the connection failed once the message was sent, so the remote may
	// have taken it (another host would make a second copy), or the
	// queued message could not be read.
	final []bool
	// ended is the status that ended the transaction for every recipient
	// the remote had not answered for good (abort).
	ended *queue.Status
	// overLimit are the recipients refused at the remote's recipient
	// limit (RFC 5321 §4.5.3.1.10).
	overLimit []int
}

// abort gives st to every recipient the remote has not answered for
// good: a 421 or a lost connection defers the whole transaction. final
// marks them final.
func (x *txn) abort(st queue.Status, final bool) []queue.Status {
	x.ended = &st
	for i := range x.out {
		if x.out[i].Code == 0 || x.out[i].Delivered() {
			x.out[i], x.final[i] = st, final
		}
	}
	return x.out
}

// fail ends the transaction with the error of step.
func (x *txn) fail(step string, err error) []queue.Status {
	s := x.s
	var se *smtp.SMTPError
	reply := errors.As(err, &se)
	if reply && (se.Code == 421 || se.Code < 400 || se.Code > 599) {
		// 421 closes; a reply that is no refusal (a 250 to DATA, a 354 to
		// MAIL) leaves the remote in a state nobody knows, for no next
		// message to find out.
		s.broken = true
	}
	st := s.commandFailure(x.ctx, step, err, false).status
	if tooManyConnections(st.Code, st.Text, false) {
		s.throttled = st.Text
	}
	// A reply after the message says what became of it (RFC 5321 §4.2.5);
	// without one the remote may have taken it (RFC 1047).
	return x.abort(st, x.sent && !reply)
}

// rcpt records the reply to the RCPT of recipient i. It returns false
// when the reply ends the transaction (421, or no reply at all).
func (x *txn) rcpt(i int, err error) bool {
	if err == nil {
		x.accepted = append(x.accepted, i)
		x.out[i] = queue.Status{Code: 250} // provisional, until the end of DATA
		return true
	}
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code == 421 {
		return false
	}
	x.out[i] = smtpErrorStatus(x.s.label, se)
	if tooManyConnections(x.out[i].Code, x.out[i].Text, false) {
		x.s.throttled = x.out[i].Text
	}
	// RFC 5321 §4.5.3.1.10: 452 at the recipient limit, or 552 from older
	// servers, which the client SHOULD take as temporary; RFC 3463 X.5.3,
	// too many recipients.
	limit552 := se.Code == 552 && se.EnhancedCode == smtp.EnhancedCode{5, 5, 3}
	if limit552 {
		x.out[i].Code, x.out[i].Enhanced = 452, "4.5.3"
	}
	if limit552 || se.EnhancedCode == (smtp.EnhancedCode{4, 5, 3}) || se.Code == 452 && !hasEnhanced(se) {
		x.overLimit = append(x.overLimit, i)
	}
	return true
}

// hasEnhanced says the reply carried an enhanced status code (RFC 3463).
func hasEnhanced(se *smtp.SMTPError) bool {
	return se.EnhancedCode != (smtp.EnhancedCode{}) && se.EnhancedCode != smtp.NoEnhancedCode && se.EnhancedCode[0] > 0
}

// copyBody sends the message to w, a dot-stuffing writer. It returns nil
// when all of it went out, else the statuses: the connection is closed,
// as only the missing final dot makes the remote drop the message.
func (x *txn) copyBody(w io.Writer, body io.Reader) []queue.Status {
	src := &readTracker{r: body}
	// io.Copy would allocate 32 KiB per message: neither side is a
	// ReaderFrom or WriterTo.
	buf := copyBufs.Get().(*[]byte)
	_, err := io.CopyBuffer(&deadlineWriter{w: w, s: x.s, d: x.s.e.opts.Timeouts.DataBlock}, src, *buf)
	copyBufs.Put(buf)
	if err == nil {
		return nil
	}
	x.s.broken = true
	x.s.close()
	if src.err != nil {
		return x.abort(queue.Status{Code: 451, Enhanced: "4.3.0", Text: "reading the queued message: " + src.err.Error()}, true)
	}
	return x.abort(transportFailure(x.ctx, x.s.label, "while sending the message", err).status, false)
}

// copyBufs hold the buffers copyBody sends a message through.
var copyBufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// delivered gives the final reply to every accepted recipient.
func (x *txn) delivered(reply string) []queue.Status {
	ok := replyStatus(x.s.label, 250, reply)
	for _, i := range x.accepted {
		x.out[i] = ok
		// RFC 3461 §4.1, §5.2.1: once NOTIFY went to a DSN-capable next
		// hop, the success notice is that hop's to send, not ours. A
		// remote without DSN cannot honour NOTIFY, so SUCCESS gets a
		// "relayed" DSN from us (§5.2.2).
		n := x.job.Recipients[i].Notify
		passed := x.dsn && validNotify(n) != nil
		x.out[i].Relayed = !passed && hasNotify(n, "SUCCESS")
	}
	return x.out
}

// lockStep sends MAIL, each RCPT and DATA one at a time, waiting for each
// reply: for remotes that do not offer PIPELINING.
func (x *txn) lockStep(mo *smtp.MailOptions, body io.Reader) []queue.Status {
	s, t, env := x.s, x.s.e.opts.Timeouts, x.job.Envelope
	s.conn.allow(maxReplyBytes)
	s.client.CommandTimeout = t.Mail
	if err := s.client.Mail(env.From, mo); err != nil {
		// A reply to MAIL applies to every recipient of the transaction.
		return x.fail("after MAIL", err)
	}
	for i, r := range x.job.Recipients {
		s.conn.allow(maxReplyBytes)
		s.client.CommandTimeout = t.Rcpt
		if err := s.client.Rcpt(r.Addr, rcptOptions(r)); !x.rcpt(i, err) {
			return x.fail("after RCPT", err)
		}
	}
	if len(x.accepted) == 0 {
		if s.rset() != nil {
			s.broken = true
		}
		return x.out
	}

	s.conn.allow(maxReplyBytes)
	s.client.CommandTimeout = t.DataInit
	w, err := s.client.Data()
	if err != nil {
		return x.fail("after DATA", err)
	}
	if st := x.copyBody(w, body); st != nil {
		return st
	}
	s.conn.allow(maxReplyBytes)
	s.client.SubmissionTimeout = t.DataFinal
	// The final dot goes with the wait for its reply: from here a failure
	// may come after the remote took the message.
	x.sent = true
	resp, err := w.CloseWithResponse()
	if err != nil {
		return x.fail("after end of data", err)
	}
	return x.delivered(resp.StatusText)
}

// reset readies an idle session for the next message: RSET, which also
// tells a connection the remote has dropped while it sat idle.
func (s *session) reset(ctx context.Context) bool {
	if s.conn == nil {
		return false
	}
	raw := s.conn.Conn
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	ok := s.rset() == nil
	// A cut after the reply has closed the connection all the same.
	return stop() && ok
}

// rset says RSET and reads its reply on the stream go-smtp's Client
// reads. go-smtp's own Client.Reset forgets the EHLO reply, so the next
// Extension call would say EHLO again: a second round trip per reused
// message, for nothing (RFC 5321 §4.1.1.5: RSET keeps the EHLO state).
func (s *session) rset() error {
	s.conn.SetDeadline(time.Now().Add(s.e.opts.Timeouts.Command))
	defer func() {
		if s.conn != nil {
			s.conn.SetDeadline(time.Time{})
		}
	}()
	if _, err := io.WriteString(s.replay, "RSET\r\n"); err != nil {
		return err
	}
	rd := s.replies()
	defer rd.release()
	_, err := rd.read(250)
	return err
}

// deadlineWriter gives each write of the message its own deadline
// (RFC 5321 §4.5.3.2.5: 3 minutes per data block).
type deadlineWriter struct {
	w io.Writer
	s *session
	d time.Duration
}

func (w *deadlineWriter) Write(p []byte) (int, error) {
	w.s.conn.SetWriteDeadline(time.Now().Add(w.d))
	return w.w.Write(p)
}

// readTracker remembers a read error, to tell a broken queue file from a
// broken connection.
type readTracker struct {
	r   io.Reader
	err error
}

func (r *readTracker) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil && err != io.EOF {
		r.err = err
	}
	return n, err
}

func rcptOptions(r queue.RecipientParams) *smtp.RcptOptions {
	o := &smtp.RcptOptions{}
	if notify := validNotify(r.Notify); notify != nil {
		o.Notify = notify
	}
	if typ, addr, ok := strings.Cut(r.ORcpt, ";"); ok {
		switch strings.ToLower(strings.TrimSpace(typ)) {
		case "rfc822":
			if a := addr; isPrintableASCII(a) && a != "" {
				o.OriginalRecipientType, o.OriginalRecipient = smtp.DSNAddressTypeRFC822, a
			}
		case "utf-8":
			if addr != "" {
				o.OriginalRecipientType, o.OriginalRecipient = smtp.DSNAddressTypeUTF8, addr
			}
		}
	}
	return o
}

// validNotify converts NOTIFY values, or returns nil for a set that RFC
// 3461 §4.1 does not allow (NEVER with others, a value twice, unknown
// words).
func validNotify(vals []string) []smtp.DSNNotify {
	var out []smtp.DSNNotify
	never := false
	for _, v := range vals {
		n := smtp.DSNNotify(strings.ToUpper(v))
		if slices.Contains(out, n) {
			// RFC 3461 §4.1 lists each value once; go-smtp would refuse
			// to write the command, and the message would never leave.
			return nil
		}
		switch n {
		case smtp.DSNNotifyNever:
			never = true
			out = append(out, n)
		case smtp.DSNNotifySuccess, smtp.DSNNotifyFailure, smtp.DSNNotifyDelayed:
			out = append(out, n)
		default:
			return nil
		}
	}
	if never && len(out) > 1 {
		return nil
	}
	return out
}

func hasNotify(vals []string, want string) bool {
	for _, v := range vals {
		if strings.EqualFold(v, want) {
			return true
		}
	}
	return false
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

func isPrintableASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}
