package delivery

import (
	"context"
	"crypto/tls"
	"fmt"
	"strings"
	"time"

	"golang.org/x/time/rate"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
)

// takeIdle removes and returns an idle session for key, or nil. A
// delivery cut off (ctx done) gets none: the session stays for others.
func (e *Engine) takeIdle(ctx context.Context, key connKey) *session {
	e.mu.Lock()
	defer e.mu.Unlock()
	if ctx.Err() != nil {
		return nil
	}
	list := e.idle[key]
	if len(list) == 0 {
		return nil
	}
	s := list[len(list)-1]
	if len(list) == 1 {
		delete(e.idle, key)
	} else {
		e.idle[key] = list[:len(list)-1]
	}
	s.idleTimer.Stop()
	return s
}

// removeIdle removes s from the idle cache and reports whether it was
// there; whoever removes it owns it.
func (e *Engine) removeIdle(s *session) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	list := e.idle[s.key]
	for i, t := range list {
		if t == s {
			list = append(list[:i], list[i+1:]...)
			if len(list) == 0 {
				delete(e.idle, s.key)
			} else {
				e.idle[s.key] = list
			}
			return true
		}
	}
	return false
}

// release ends the use of s by one delivery: it waits in the idle cache
// for the next message to the same destination, or is closed when it is
// broken or has carried as many transactions as it may (transactionLimit).
func (e *Engine) release(s *session) {
	most, _ := s.transactionLimit()
	spent := most > 0 && s.messages >= most
	if s.broken || s.refusesRecipients || s.conn == nil || e.opts.IdleTimeout < 0 || spent {
		s.quitQuietly()
		e.releaseSlot(s.shapeKey)
		return
	}
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		s.quitQuietly()
		e.releaseSlot(s.shapeKey)
		return
	}
	e.idle[s.key] = append(e.idle[s.key], s)
	if s.idleTimer != nil {
		// The timer of the connection's last idle spell, stopped when it
		// was taken: the same function, rescheduled, spares a timer and
		// a closure per message.
		s.idleTimer.Reset(e.opts.IdleTimeout)
	} else {
		s.idleTimer = time.AfterFunc(e.opts.IdleTimeout, func() {
			if e.removeIdle(s) {
				s.quitQuietly()
				e.releaseSlot(s.shapeKey)
			}
		})
	}
	// A delivery waiting for a slot of this destination may be for another
	// route or domain on the same hosts, which cannot reuse this connection:
	// wake it to close the connection now, not when the idle timer fires.
	if d := e.dests[s.shapeKey]; d != nil && d.waiters > 0 {
		close(d.wake)
		d.wake = make(chan struct{})
	}
	e.mu.Unlock()
}

// destState is the traffic shaping of one destination key: a recipient
// domain, a route's nexthop, or the hosts of an mx_hosts limit.
type destState struct {
	open    int           // connections open, busy or idle
	waiters int           // deliveries waiting for a slot
	wake    chan struct{} // closed and replaced when a slot frees: wakes this key's waiters only
	shaping Shaping
	limiter *rate.Limiter // nil: no rate limit
	// lowered, until loweredUntil, caps open connections after the
	// destination said it has too many of ours.
	lowered      int
	loweredUntil time.Time
}

// destLocked returns the state of key, creating it, with the latest
// limits (a reload may have changed them).
func (e *Engine) destLocked(key string, sh Shaping) *destState {
	d := e.dests[key]
	if d == nil {
		d = &destState{wake: make(chan struct{})}
		e.dests[key] = d
	}
	d.shaping = sh
	switch {
	case sh.Rate <= 0:
		d.limiter = nil
	case d.limiter == nil:
		d.limiter = rate.NewLimiter(sh.Rate, 1)
	case d.limiter.Limit() != sh.Rate:
		d.limiter.SetLimit(sh.Rate)
	}
	return d
}

// maxLocked is how many connections d may have open now; restored says
// a lowered limit has just run out (the caller logs it, unlocked).
func (e *Engine) maxLocked(d *destState) (n int, restored bool) {
	n = d.shaping.MaxConnections
	if n <= 0 {
		n = e.opts.MaxConnsPerDomain
	}
	if d.lowered > 0 {
		if e.now().Before(d.loweredUntil) {
			return min(n, d.lowered), false
		}
		d.lowered = 0
		return n, true
	}
	return n, false
}

// forgetLocked drops the state of a key nobody uses, so the map holds
// only destinations in use; a rate limiter is kept until it has refilled,
// or forgetting would grant a burst.
func (e *Engine) forgetLocked(key string, d *destState) {
	if d.open > 0 || d.waiters > 0 || d.lowered > 0 && e.now().Before(d.loweredUntil) {
		return
	}
	if d.limiter != nil && d.limiter.TokensAt(e.now()) < 1 {
		return
	}
	delete(e.dests, key)
}

// acquireSlot waits until h's destination may have one more connection,
// closing an idle one to the same destination to make room if need be.
func (e *Engine) acquireSlot(ctx context.Context, h hop) error {
	for {
		e.mu.Lock()
		d := e.destLocked(h.key, h.shaping)
		n, restored := e.maxLocked(d)
		if d.open < n {
			d.open++
			e.mu.Unlock()
			if restored {
				e.log.Info("destination concurrency restored", "destination", h.key, "max_connections", n)
			}
			return nil
		}
		var victim *session
		for _, list := range e.idle {
			if len(list) > 0 && list[0].shapeKey == h.key {
				victim = list[0]
				break
			}
		}
		wake := d.wake
		if victim == nil {
			d.waiters++
		}
		e.mu.Unlock()
		if victim != nil {
			if e.removeIdle(victim) {
				victim.idleTimer.Stop()
				victim.quitQuietly()
				e.releaseSlot(victim.shapeKey)
			}
			continue
		}
		var err error
		select {
		case <-wake:
		case <-ctx.Done():
			err = context.Cause(ctx)
		}
		e.mu.Lock()
		d.waiters--
		e.forgetLocked(h.key, d)
		e.mu.Unlock()
		if err != nil {
			return err
		}
	}
}

func (e *Engine) releaseSlot(key string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	d := e.dests[key]
	if d == nil {
		return
	}
	d.open--
	close(d.wake)
	d.wake = make(chan struct{})
	e.forgetLocked(key, d)
}

// waitRate waits until h's destination may take one more message.
func (e *Engine) waitRate(ctx context.Context, h hop) error {
	e.mu.Lock()
	d := e.destLocked(h.key, h.shaping)
	lim := d.limiter
	d.waiters++ // keeps the limiter while we wait
	e.mu.Unlock()
	var err error
	if lim != nil {
		err = lim.Wait(ctx)
	}
	e.mu.Lock()
	d.waiters--
	e.forgetLocked(h.key, d)
	e.mu.Unlock()
	return err
}

// throttle lowers the concurrency of h's destination after it said it has
// too many connections from us: to the connections that it still accepts
// (at least one) for ThrottleFor, logged once when the lowering starts,
// and tells the queue to hold back the domain's other messages alike.
func (e *Engine) throttle(h hop, job *queue.Job, reason string) {
	e.mu.Lock()
	d := e.destLocked(h.key, h.shaping)
	cur, _ := e.maxLocked(d)
	n := max(1, min(cur-1, d.open))
	first := d.lowered == 0
	d.lowered, d.loweredUntil = n, e.now().Add(e.opts.ThrottleFor)
	e.mu.Unlock()
	metricThrottled.Inc()
	if first {
		e.log.Warn("destination says too many connections; lowering concurrency", "destination", h.key,
			"max_connections", n, "for", e.opts.ThrottleFor, "reply", reason)
	}
	if job.Throttle != nil {
		job.Throttle(n, e.opts.ThrottleFor)
	}
}

// Close says QUIT on every idle connection. Deliveries still running
// finish; their connections are closed instead of cached.
func (e *Engine) Close() error {
	e.mu.Lock()
	e.closed = true
	var idle []*session
	for _, list := range e.idle {
		idle = append(idle, list...)
	}
	clear(e.idle)
	e.mu.Unlock()
	for _, s := range idle {
		s.idleTimer.Stop()
		s.quitQuietly()
		e.releaseSlot(s.shapeKey)
	}
	return nil
}

// record counts r, made under req, and hands it to the Recorder, if
// there is one.
func (e *Engine) record(req policy.Requirement, r policy.SessionResult) {
	if req.Source() == policy.TypeTLSA || req.Security == policy.SecurityDANE {
		outcome := string(r.Result)
		if r.Result == policy.ResultSuccess {
			outcome = "authenticated"
			if !req.Security.Authenticates() {
				outcome = "encrypted"
			}
		}
		metricDANESessions.WithLabelValues(outcome).Inc()
	}
	if e.opts.Recorder == nil {
		return
	}
	r.Time = e.now()
	e.opts.Recorder.Record(r)
}

func (k failKind) String() string {
	switch k {
	case failRoute:
		return "dns"
	case failTransport:
		return "transport"
	case failSTS:
		return "mta-sts"
	case failDANE:
		return "dane"
	case failLocal:
		return "local-policy"
	case failRequireTLS:
		return "requiretls"
	case failUTF8:
		return "smtputf8"
	case failEightBit:
		return "8bitmime"
	case failSize:
		return "size"
	case failAuth:
		return "auth"
	}
	return "unknown"
}

// aggregate is the status every recipient gets when no host took the
// message (docs/DESIGN.md, "What deferrals say").
func aggregate(nh NextHop, fails []*hostFailure) queue.Status {
	// The hosts the statuses speak of: the recipient domain's MX hosts,
	// or a route's next hop, whose host failed and not the domain's.
	hosts, host := fmt.Sprintf("MX hosts of '%s'", nh.Domain), fmt.Sprintf("MX host of '%s'", nh.Domain)
	if nh.Route != "" {
		hosts = fmt.Sprintf("hosts of %s's nexthop %s", nh.Route, nh.String())
		host = fmt.Sprintf("host of %s's nexthop %s", nh.Route, nh.String())
	}
	if len(fails) == 0 {
		if nh.Route != "" {
			return queue.Status{Code: 451, Enhanced: "4.4.4", Text: "no usable " + host}
		}
		return queue.Status{Code: 451, Enhanced: "4.4.4", Text: fmt.Sprintf("no usable MX host for %s", nh.Domain)}
	}
	count := map[failKind]int{}
	for _, f := range fails {
		count[f.kind]++
	}
	only := func(kinds ...failKind) bool {
		n := 0
		for _, k := range kinds {
			n += count[k]
		}
		return n == len(fails)
	}
	switch {
	case only(failSTS):
		// No RFC code for MTA-STS; 4.4.8 is what a large provider uses
		// (docs/DESIGN.md). RFC 8461 §5: never a permanent failure.
		return queue.Status{Code: 451, Enhanced: "4.4.8", Text: truncateList(
			hosts+" failed MTA-STS validation: ", reasons(fails))}
	case only(failSTS, failDANE, failLocal):
		return queue.Status{Code: 451, Enhanced: "4.7.5", Text: truncateList("", texts(fails))}
	case only(failRequireTLS, failUTF8, failEightBit):
		// Every host was reached or judged, and none can ever take this
		// message as it is: fail now rather than retry for days
		// (RFC 8689 §4.2.1: 5.7.30).
		st := fails[0].status
		st.RemoteMTA, st.Reply = "", ""
		if count[failRequireTLS] > 0 {
			st.Code, st.Enhanced = 550, "5.7.30"
			st.Text = truncateList("message requires TLS (REQUIRETLS) but no "+host+" qualifies: ", texts(fails))
		} else if count[failUTF8] > 0 {
			st.Code, st.Enhanced = 550, "5.6.7"
			st.Text = truncateList("no "+host+" supports SMTPUTF8, which this message needs: ", texts(fails))
		} else {
			st.Code, st.Enhanced = 550, "5.6.3"
			st.Text = truncateList("no "+host+" supports 8BITMIME, which this message needs: ", texts(fails))
		}
		return st
	}
	// Mixed reasons: the best host's temporary failure decides the code, so
	// a host that was merely unreachable never turns into a bounce. An
	// address of a host that then refused on another one is not such a
	// host (spokenFor).
	pick := -1
	for i, f := range fails {
		if f.spokenFor {
			continue
		}
		if pick < 0 || !f.status.Permanent() {
			pick = i
		}
		if !f.status.Permanent() {
			break
		}
	}
	st := fails[max(pick, 0)].status
	if len(fails) > 1 {
		st.Text = truncateList("", texts(fails))
	}
	return st
}

// reasons lists "mx1.example.com: certificate name mismatch" once per host.
func reasons(fails []*hostFailure) []string {
	var out []string
	seen := map[string]bool{}
	for _, f := range fails {
		l := f.host + ": " + f.reason
		if !seen[l] {
			seen[l] = true
			out = append(out, l)
		}
	}
	return out
}

func texts(fails []*hostFailure) []string {
	var out []string
	seen := map[string]bool{}
	for _, f := range fails {
		if !seen[f.status.Text] {
			seen[f.status.Text] = true
			out = append(out, f.status.Text)
		}
	}
	return out
}

// truncateList joins items after prefix, keeping the result short enough
// for a DSN's Diagnostic-Code and a log line.
func truncateList(prefix string, items []string) string {
	const max = 900
	s := prefix + strings.Join(items, "; ")
	if len(s) <= max {
		return s
	}
	return strings.ToValidUTF8(s[:max], "") + ellipsis
}

// tlsVersionName spells a TLS version as logs and Received headers do
// everywhere in stsrelay, the Postfix way: "TLSv1.3".
func tlsVersionName(v uint16) string {
	return strings.Replace(tls.VersionName(v), "TLS ", "TLSv", 1)
}
