package delivery

import (
	"context"
	"crypto/tls"
	"fmt"
	"strings"
	"time"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
)

// takeIdle removes and returns an idle session for key, or nil.
func (e *Engine) takeIdle(key connKey) *session {
	e.mu.Lock()
	defer e.mu.Unlock()
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
// for the next message to the same domain, or is closed.
func (e *Engine) release(s *session) {
	if s.broken || s.conn == nil || e.opts.IdleTimeout < 0 {
		s.quitQuietly()
		e.releaseSlot(s.domain)
		return
	}
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		s.quitQuietly()
		e.releaseSlot(s.domain)
		return
	}
	e.idle[s.key] = append(e.idle[s.key], s)
	s.idleTimer = time.AfterFunc(e.opts.IdleTimeout, func() {
		if e.removeIdle(s) {
			s.quitQuietly()
			e.releaseSlot(s.domain)
		}
	})
	e.mu.Unlock()
}

// acquireSlot waits until a new connection to domain is allowed
// (MaxConnsPerDomain), closing an idle one to make room if need be.
func (e *Engine) acquireSlot(ctx context.Context, domain string) error {
	for {
		e.mu.Lock()
		if e.slots[domain] < e.opts.MaxConnsPerDomain {
			e.slots[domain]++
			e.mu.Unlock()
			return nil
		}
		var victim *session
		for key, list := range e.idle {
			if key.domain == domain && len(list) > 0 {
				victim = list[0]
				break
			}
		}
		wake := e.wake
		e.mu.Unlock()
		if victim != nil && e.removeIdle(victim) {
			victim.idleTimer.Stop()
			victim.quitQuietly()
			return nil // its slot is now ours
		}
		if victim != nil {
			continue
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
}

func (e *Engine) releaseSlot(domain string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.slots[domain]--; e.slots[domain] <= 0 {
		delete(e.slots, domain)
	}
	close(e.wake)
	e.wake = make(chan struct{})
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
		e.releaseSlot(s.domain)
	}
	return nil
}

// record hands r to the Recorder, if there is one.
func (e *Engine) record(r policy.SessionResult) {
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
	}
	return "unknown"
}

// aggregate is the status every recipient gets when no host took the
// message (DESIGN.md decision 6).
func aggregate(domain string, fails []*hostFailure) queue.Status {
	if len(fails) == 0 {
		return queue.Status{Code: 451, Enhanced: "4.4.4", Text: fmt.Sprintf("no usable MX host for %s", domain)}
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
		// (RFC-NOTES). RFC 8461 §5: never a permanent failure.
		return queue.Status{Code: 451, Enhanced: "4.4.8", Text: truncateList(
			fmt.Sprintf("MX hosts of '%s' failed MTA-STS validation: ", domain), reasons(fails))}
	case only(failSTS, failDANE, failLocal):
		return queue.Status{Code: 451, Enhanced: "4.7.5", Text: truncateList("", texts(fails))}
	case only(failRequireTLS, failUTF8):
		// Every host was reached or judged, and none can ever take this
		// message as it is: fail now rather than retry for days
		// (RFC 8689 §4.2.1: 5.7.30).
		st := fails[0].status
		st.RemoteMTA = ""
		if count[failRequireTLS] > 0 {
			st.Code, st.Enhanced = 550, "5.7.30"
			st.Text = truncateList(fmt.Sprintf("message requires TLS (REQUIRETLS) but no MX host of '%s' qualifies: ", domain), texts(fails))
		} else {
			st.Text = truncateList(fmt.Sprintf("no MX host of '%s' supports SMTPUTF8, which this message needs: ", domain), texts(fails))
		}
		return st
	}
	// Mixed reasons: the best host's temporary failure decides the code, so
	// a host that was merely unreachable never turns into a bounce.
	st := fails[0].status
	for _, f := range fails {
		if !f.status.Permanent() {
			st = f.status
			break
		}
	}
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
	return strings.ToValidUTF8(s[:max], "") + "…"
}

// tlsVersionName spells a TLS version as logs and Received headers do
// everywhere in stsrelay, the Postfix way: "TLSv1.3".
func tlsVersionName(v uint16) string {
	return strings.Replace(tls.VersionName(v), "TLS ", "TLSv", 1)
}
