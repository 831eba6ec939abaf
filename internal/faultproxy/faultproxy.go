// Package faultproxy is a TCP proxy for tests that puts network faults
// between a client and a real server on loopback: a delayed greeting, a
// connection reset in the middle of a transfer, a peer that stalls or
// never answers, a reply replaced by another. A fault fires when the
// client's byte stream reaches a given string, so that a test can aim at
// one step of a protocol ("DATA\r\n", "\r\n.\r\n", "QUIT\r\n").
package faultproxy

import (
	"bytes"
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// Rule is one fault: when the client has sent When on connection number
// Conn, the proxy does Then.
type Rule struct {
	// When is what the client sends that fires the rule; "" fires it as
	// the connection opens.
	When string
	// Conn restricts the rule to the n-th connection the proxy accepts
	// (from 1); 0 means every connection.
	Conn int
	Then Action
}

// Action is what a fired rule does; make one with the functions below.
type Action struct {
	kind  actionKind
	delay time.Duration
	after int
	reply string
}

type actionKind int

const (
	actDelay actionKind = iota + 1
	actReset
	actStall
	actReply
)

// DelayServer forwards When, then holds back what the server sends for d:
// with When "" the greeting comes d late.
func DelayServer(d time.Duration) Action { return Action{kind: actDelay, delay: d} }

// ResetAfter forwards When and n more bytes of the client's, then resets
// both connections (RST, as a crashed peer or a middlebox would).
func ResetAfter(n int) Action { return Action{kind: actReset, after: n} }

// Reset resets both connections instead of forwarding When.
func Reset() Action { return Action{kind: actReset, after: -1} }

// Stall forwards nothing from When on, in either direction, and keeps both
// connections open until the client closes its own: a peer that stopped
// answering. The server never sees When, and its answers to what came
// in the same read as When are held back too.
func Stall() Action { return Action{kind: actStall} }

// Reply sends s to the client instead of forwarding When, then closes
// both connections, as a server shutting down mid-session does.
func Reply(s string) Action { return Action{kind: actReply, reply: s} }

// Proxy listens on 127.0.0.1 and forwards each connection to its target,
// applying its rules.
type Proxy struct {
	Addr   string // host:port to dial instead of the target
	target string
	ln     net.Listener
	wg     sync.WaitGroup

	mu       sync.Mutex
	rules    []Rule
	accepted int
	fired    []Rule
	open     map[net.Conn]bool
}

// New starts a proxy to target and stops it, with every connection it
// holds, when the test ends.
func New(t testing.TB, target string, rules ...Rule) *Proxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("faultproxy: %v", err)
	}
	p := &Proxy{Addr: ln.Addr().String(), target: target, ln: ln, rules: rules, open: map[net.Conn]bool{}}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.Close)
	return p
}

// SetRules replaces the rules for connections accepted from now on.
func (p *Proxy) SetRules(rules ...Rule) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.rules = rules
}

// Accepted is how many connections the proxy has accepted.
func (p *Proxy) Accepted() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.accepted
}

// Fired returns the rules that fired, in order.
func (p *Proxy) Fired() []Rule {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Rule(nil), p.fired...)
}

// Close stops the proxy and closes every connection it holds; it returns
// when all its goroutines have.
func (p *Proxy) Close() {
	p.ln.Close()
	p.mu.Lock()
	for c := range p.open {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.accepted++
		n := p.accepted
		var rules []Rule
		for _, r := range p.rules {
			if r.Conn == 0 || r.Conn == n {
				rules = append(rules, r)
			}
		}
		p.mu.Unlock()
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.serve(client, rules)
		}()
	}
}

// link is one proxied connection.
type link struct {
	p              *Proxy
	client, server net.Conn

	clientDone chan struct{} // closed when the client side has ended

	mu        sync.Mutex
	holdUntil time.Time // server bytes wait until then
	stalled   bool
}

func (p *Proxy) track(c net.Conn, on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if on {
		p.open[c] = true
	} else {
		delete(p.open, c)
	}
}

func (p *Proxy) serve(client net.Conn, rules []Rule) {
	p.track(client, true)
	defer p.track(client, false)
	defer client.Close()
	server, err := net.DialTimeout("tcp", p.target, 5*time.Second)
	if err != nil {
		return
	}
	p.track(server, true)
	defer p.track(server, false)
	defer server.Close()
	l := &link{p: p, client: client, server: server, clientDone: make(chan struct{})}

	var pending []Rule
	for _, r := range rules {
		if r.When == "" {
			if l.fire(r) {
				return
			}
			continue
		}
		pending = append(pending, r)
	}

	done := make(chan struct{})
	go func() {
		defer close(done)
		l.serverToClient()
	}()
	l.clientToServer(pending)
	close(l.clientDone)
	<-done
}

// fire applies a rule with an empty When as the connection opens; it
// reports whether the connection is finished.
func (l *link) fire(r Rule) bool {
	l.p.mu.Lock()
	l.p.fired = append(l.p.fired, r)
	l.p.mu.Unlock()
	switch r.Then.kind {
	case actDelay:
		l.mu.Lock()
		l.holdUntil = time.Now().Add(r.Then.delay)
		l.mu.Unlock()
	case actReset:
		l.reset()
		return true
	case actStall:
		l.stall()
		return true
	case actReply:
		l.client.Write([]byte(r.Then.reply))
		return true
	}
	return false
}

// clientToServer forwards the client's bytes, watching for the rules.
func (l *link) clientToServer(rules []Rule) {
	defer func() {
		if tc, ok := l.server.(*net.TCPConn); ok {
			tc.CloseWrite()
		}
	}()
	var seen []byte // the end of what went before, for matches across reads
	resetIn := -1   // bytes left to forward before a reset
	buf := make([]byte, 32<<10)
	for {
		n, err := l.client.Read(buf)
		chunk := buf[:n]
		for len(chunk) > 0 {
			if resetIn >= 0 {
				k := min(resetIn, len(chunk))
				l.server.Write(chunk[:k])
				resetIn -= k
				if resetIn == 0 {
					l.reset()
					return
				}
				break
			}
			r, start, end := firstMatch(seen, chunk, rules)
			if end == 0 {
				l.server.Write(chunk)
				seen = keepTail(append(seen, chunk...), rules)
				break
			}
			if r.Then.kind == actStall {
				// Before the bytes ahead of When go on: the server's
				// answers to them must not race through either, or where
				// the client sees the silence begin would be luck.
				l.setStalled()
			}
			// start < 0: the match began in an earlier read, forwarded
			// already.
			l.server.Write(chunk[:max(start, 0)])
			rules = without(rules, r)
			l.p.mu.Lock()
			l.p.fired = append(l.p.fired, r)
			l.p.mu.Unlock()
			switch r.Then.kind {
			case actDelay:
				l.server.Write(chunk[max(start, 0):end])
				l.mu.Lock()
				l.holdUntil = time.Now().Add(r.Then.delay)
				l.mu.Unlock()
			case actReset:
				if r.Then.after < 0 {
					l.reset()
					return
				}
				l.server.Write(chunk[max(start, 0):end])
				if r.Then.after == 0 {
					l.reset()
					return
				}
				resetIn = r.Then.after
			case actStall:
				l.stall()
				return
			case actReply:
				l.client.Write([]byte(r.Then.reply))
				l.client.Close() // nothing the server still sends gets through
				return
			}
			seen = keepTail(append(seen, chunk[:end]...), rules)
			chunk = chunk[end:]
		}
		if err != nil {
			return
		}
	}
}

// serverToClient forwards the server's bytes, late when a delay is set.
func (l *link) serverToClient() {
	buf := make([]byte, 32<<10)
	for {
		n, err := l.server.Read(buf)
		if n > 0 {
			l.mu.Lock()
			wait, stalled := time.Until(l.holdUntil), l.stalled
			l.mu.Unlock()
			if stalled {
				return
			}
			if wait > 0 {
				select {
				case <-time.After(wait):
				case <-l.clientDone:
					return
				}
			}
			if _, werr := l.client.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if tc, ok := l.client.(*net.TCPConn); ok {
				tc.CloseWrite()
			}
			return
		}
	}
}

// reset closes both connections with RST.
func (l *link) reset() {
	for _, c := range []net.Conn{l.client, l.server} {
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
		c.Close()
	}
}

// stall stops all forwarding and waits for the client to close.
func (l *link) stall() {
	l.setStalled()
	io.Copy(io.Discard, l.client)
}

func (l *link) setStalled() {
	l.mu.Lock()
	l.stalled = true
	l.mu.Unlock()
}

// firstMatch finds the rule whose When, in seen+chunk, ends first within
// chunk, and where it starts and ends in chunk (start is negative when it
// began in seen).
func firstMatch(seen, chunk []byte, rules []Rule) (r Rule, start, end int) {
	all := append(append([]byte(nil), seen...), chunk...)
	found := false
	for _, c := range rules {
		j := bytes.Index(all, []byte(c.When))
		if j < 0 || j+len(c.When) <= len(seen) {
			continue
		}
		if e := j + len(c.When) - len(seen); !found || e < end {
			r, start, end, found = c, j-len(seen), e, true
		}
	}
	if !found {
		return Rule{}, 0, 0
	}
	return r, start, end
}

// keepTail keeps as much of b as a match across reads could need.
func keepTail(b []byte, rules []Rule) []byte {
	longest := 0
	for _, r := range rules {
		longest = max(longest, len(r.When)-1)
	}
	if len(b) > longest {
		b = append([]byte(nil), b[len(b)-longest:]...)
	}
	return b
}

// without drops the first rule equal to r.
func without(rules []Rule, r Rule) []Rule {
	out := make([]Rule, 0, len(rules))
	dropped := false
	for _, c := range rules {
		if !dropped && c == r {
			dropped = true
			continue
		}
		out = append(out, c)
	}
	return out
}
