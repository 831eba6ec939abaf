package smtpin

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// listener admits connections: it refuses a client over MaxConnsPerIP, or
// any client while MaxConns are open, unless trusted, before go-smtp sees it.
type listener struct {
	net.Listener
	srv         *Server
	name        string // metrics label: "submission" or "submissions"
	implicitTLS bool
}

func (l *listener) Accept() (net.Conn, error) {
	for {
		nc, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if c := l.srv.admit(nc, l.name, l.implicitTLS); c != nil {
			return c, nil
		}
	}
}

// admit wraps nc, or refuses it and returns nil.
func (s *Server) admit(nc net.Conn, listenerName string, implicitTLS bool) *conn {
	ip := remoteIP(nc)
	key := clientKey(ip)

	// Trusted networks are not capped: a Postfix relayhost opens as many
	// connections as its own concurrency limit allows (20 by default), and
	// a flood from elsewhere must not lock it out. They count towards
	// MaxConns all the same.
	trusted := s.isTrusted(ip)
	var c *conn
	refusal := ""
	s.mu.Lock()
	switch {
	case !trusted && len(s.conns) >= s.opts.MaxConns:
		refusal = "server_full"
	case !trusted && s.perIP[key] >= s.opts.MaxConnsPerIP:
		refusal = "too_many"
	default:
		s.perIP[key]++
		c = &conn{Conn: nc, srv: s, ip: ip, key: key, id: s.connSeq.Add(1), implicitTLS: implicitTLS, replied: time.Now()}
		s.conns[c] = struct{}{}
	}
	s.mu.Unlock()

	if c == nil {
		metricConnections.WithLabelValues(listenerName, refusal).Inc()
		reply := fmt.Sprintf("421 4.7.0 %s too many connections from %s, try again later\r\n", s.opts.Hostname, ip)
		if refusal == "server_full" {
			reply = fmt.Sprintf("421 4.3.2 %s too many connections, try again later\r\n", s.opts.Hostname)
		}
		s.logRefusal(refusal, ip)
		go func() {
			if !implicitTLS {
				// Before TLS there is nobody to talk to on port 465; on
				// 587 the client learns why (RFC 5321 §3.8: 421 at greeting).
				nc.SetWriteDeadline(time.Now().Add(10 * time.Second))
				nc.Write([]byte(reply))
			}
			nc.Close()
		}()
		return nil
	}
	metricConnections.WithLabelValues(listenerName, "accepted").Inc()
	s.log.Debug("smtpin: connected", "conn", c.id, "client", ip, "listener", listenerName)
	return c
}

// logRefusal logs a refused connection, at most a few lines a second: a
// flood must not turn into a flood of log lines.
func (s *Server) logRefusal(refusal string, ip netip.Addr) {
	more, ok := s.refusalLog.allow()
	if !ok {
		return
	}
	attrs := append([]any{"client", ip}, more...)
	if refusal == "server_full" {
		s.log.Warn("smtpin: connection refused: too many connections in all", append(attrs, "limit", s.opts.MaxConns)...)
		return
	}
	s.log.Warn("smtpin: connection refused: too many connections from client", append(attrs, "limit", s.opts.MaxConnsPerIP)...)
}

// errCut is what reads return once a connection is being cut off. It wraps
// net.ErrClosed so that go-smtp ends the session without a word of its own.
var errCut = fmt.Errorf("smtpin: connection cut off: %w", net.ErrClosed)

// conn is a client connection. Outside a message, the client has the
// command timeout from our last reply (or from its connection) to send
// what comes next: a command whole (RFC 5321 §4.5.3.2.7), or its half of
// a TLS handshake. A read that brings a byte does not push that back, so
// that a client dripping a byte every few minutes cannot hold a slot for
// days. Inside a message each read gets the data timeout afresh, as in
// Postfix: a large message over a slow link takes as long as it takes.
//
// conn also closes three holes that go-smtp v0.25.1 (and v0.26.0) leaves
// open, by watching the bytes go past:
//   - after a failed STARTTLS handshake go-smtp answers "550" and goes on
//     reading commands in plaintext: here, the session ends instead;
//   - after a rejected message go-smtp reads the rest of it with no bound
//     but the idle timeout: here, that drain gets DataTimeout in all;
//   - a client may not send more than maxUnanswered bytes without a reply
//     from us, which bounds every other discard go-smtp does (BDAT chunks).
type conn struct {
	net.Conn
	srv         *Server
	ip          netip.Addr
	key         netip.Prefix
	id          uint64 // in log lines, to tell one client's sessions apart
	implicitTLS bool

	inData   atomic.Bool
	expired  atomic.Bool  // a read timed out during DATA: end the session now
	cut      atomic.Bool  // being cut off: no more reads, no more commands
	refusals atomic.Int32 // since the last message accepted (session.refused)

	mu          sync.Mutex // orders deadline updates against wake; guards what follows
	replied     time.Time  // our last write, or the connection's start
	greeted     bool       // the greeting has been written
	startingTLS bool       // we answered STARTTLS with 220: only TLS records may follow
	draining    bool       // go-smtp is reading the rest of a message we rejected
	drainBy     time.Time
	unanswered  int64 // bytes read since we last wrote
	// writesClosed: the last reply of a cut connection is out.
	writesClosed bool
	closeOnce    sync.Once
	lingering    atomic.Bool // lingerClose closes the socket
}

func (c *conn) Read(b []byte) (int, error) {
	c.mu.Lock()
	if c.cut.Load() {
		c.mu.Unlock()
		return 0, errCut
	}
	now := time.Now()
	deadline := c.replied.Add(c.srv.opts.CommandTimeout)
	if c.inData.Load() {
		deadline = now.Add(c.srv.opts.DataTimeout)
	}
	if c.draining && c.drainBy.Before(deadline) {
		deadline = c.drainBy
	}
	if c.expired.Load() || c.srv.isDraining() && !c.inData.Load() {
		// Shutting down, or the client stalled in DATA: the next read fails,
		// so go-smtp does not wait a command timeout to discard the rest.
		deadline = now
	}
	left := c.srv.maxUnanswered - c.unanswered
	if left <= 0 {
		c.cutLocked("the client sent too much without waiting for a reply", "limit", c.srv.maxUnanswered)
		c.mu.Unlock()
		return 0, errCut
	}
	if int64(len(b)) > left {
		b = b[:left]
	}
	err := c.Conn.SetReadDeadline(deadline)
	c.mu.Unlock()
	if err != nil {
		return 0, err
	}
	n, err := c.Conn.Read(b)
	c.mu.Lock()
	c.unanswered += int64(n)
	if err != nil && c.draining {
		// The rest of a rejected message did not come (in time): the
		// client may still be inside it, so reading commands now could
		// run its text as commands.
		c.cutLocked("reading the rest of a rejected message failed", "err", err)
	}
	c.mu.Unlock()
	return n, err
}

func (c *conn) Write(p []byte) (int, error) {
	c.mu.Lock()
	if c.writesClosed {
		c.mu.Unlock()
		return 0, net.ErrClosed
	}
	out := p
	if c.startingTLS && !isTLSRecord(p) {
		// After our "220" to STARTTLS only TLS records go out; go-smtp
		// writes plaintext only to report a failed handshake, and would
		// then carry on in plaintext. End the session instead: RFC 3207
		// §4 leaves no state to go back to.
		c.cutLocked("TLS handshake after STARTTLS failed")
		out = fmt.Appendf(nil, "421 4.7.0 %s TLS handshake failed, closing connection\r\n", c.srv.opts.Hostname)
	}
	// The greeting is the only other 220 go-smtp sends. The 220 comes last
	// in its write: replies held for a pipelined group (RSET before
	// STARTTLS, say) go out ahead of it.
	if !c.implicitTLS && c.greeted && !c.startingTLS && bytes.HasPrefix(lastLine(p), []byte("220 ")) {
		c.startingTLS = true
	}
	c.greeted = true
	c.unanswered = 0
	c.replied = time.Now()
	last := c.cut.Load()
	if last {
		// The reply still goes out; then the connection closes, so that
		// nothing go-smtp has buffered is ever run as a command.
		c.writesClosed = true
	} else {
		c.draining = false // a reply ends the drain of a rejected message
	}
	c.mu.Unlock()

	if last {
		c.Conn.SetWriteDeadline(time.Now().Add(10 * time.Second))
		_, err := c.Conn.Write(out)
		c.lingerClose()
		if err != nil {
			return 0, err
		}
		return len(p), nil
	}
	if _, err := c.Conn.Write(out); err != nil {
		return 0, err
	}
	return len(p), nil
}

// cutOff is cutLocked for a caller that does not hold c.mu.
func (c *conn) cutOff(why string, attrs ...any) {
	c.mu.Lock()
	c.cutLocked(why, attrs...)
	c.mu.Unlock()
}

// cutLocked starts cutting the connection off: reads fail from now on,
// the session takes no more commands, and the next reply is the last.
// c.mu is held.
func (c *conn) cutLocked(why string, attrs ...any) {
	if c.cut.Swap(true) {
		return
	}
	metricCutOff.Inc()
	c.srv.log.Info("smtpin: closing connection: "+why, append([]any{"conn", c.id, "client", c.ip}, attrs...)...)
}

// beginDrain is called when a message is rejected before go-smtp has
// read all of it: what is left gets DataTimeout in all, not per read.
func (c *conn) beginDrain() {
	c.mu.Lock()
	c.draining = true
	c.drainBy = time.Now().Add(c.srv.opts.DataTimeout)
	c.mu.Unlock()
}

// lastLine returns the last CRLF-ended line of p (all of p if it has one
// line).
func lastLine(p []byte) []byte {
	p = bytes.TrimSuffix(p, []byte("\r\n"))
	if i := bytes.LastIndex(p, []byte("\r\n")); i >= 0 {
		return p[i+2:]
	}
	return p
}

// isTLSRecord reports whether p starts with a TLS record header: a content
// type from change_cipher_spec (20) to heartbeat (24) and major version 3.
func isTLSRecord(p []byte) bool {
	return len(p) >= 5 && p[0] >= 20 && p[0] <= 24 && p[1] == 3
}

// wake makes a session blocked on reading a command give up (go-smtp then
// answers 421 and closes). A message being received is left alone.
func (c *conn) wake() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.inData.Load() {
		c.Conn.SetReadDeadline(time.Now())
	}
}

func (c *conn) Close() error {
	if c.lingering.Load() {
		return nil // lingerClose's goroutine closes it
	}
	c.release()
	return c.Conn.Close()
}

// release takes the connection out of the server's counts.
func (c *conn) release() {
	c.closeOnce.Do(func() {
		s := c.srv
		s.mu.Lock()
		delete(s.conns, c)
		if s.perIP[c.key]--; s.perIP[c.key] <= 0 {
			delete(s.perIP, c.key)
		}
		s.mu.Unlock()
	})
}

// Lingering after the last reply of a cut connection: at most this long,
// and this many bytes read and dropped.
const (
	lingerTime  = 2 * time.Second
	lingerBytes = 256 << 10
)

// lingerClose closes a connection whose last reply was just written. A
// socket closed with unread input resets the connection (RFC 1122
// §4.2.2.13), and a reset drops whatever of that reply is still unsent
// or unread at the client: the 421 that says why would be lost exactly
// when a client pipelined ahead. So the write side is shut first (FIN
// after the reply) and the input read and dropped, briefly, before the
// close; the server still counts the connection until then, so that
// Shutdown waits for it.
func (c *conn) lingerClose() {
	cw, ok := c.Conn.(interface{ CloseWrite() error })
	if !ok || cw.CloseWrite() != nil {
		c.Conn.Close()
		return
	}
	c.lingering.Store(true)
	go func() {
		c.Conn.SetReadDeadline(time.Now().Add(lingerTime))
		io.CopyN(io.Discard, c.Conn, lingerBytes)
		c.Conn.Close()
		c.release()
	}()
}

func (s *Server) isDraining() bool { return s.draining.Load() }

// connOf finds our conn below go-smtp's net.Conn, which is a *tls.Conn
// after STARTTLS or on the implicit TLS port.
func connOf(nc net.Conn) *conn {
	if tc, ok := nc.(*tls.Conn); ok {
		nc = tc.NetConn()
	}
	c, _ := nc.(*conn)
	return c
}

func remoteIP(nc net.Conn) netip.Addr {
	if ta, ok := nc.RemoteAddr().(*net.TCPAddr); ok {
		return ta.AddrPort().Addr().Unmap()
	}
	ap, err := netip.ParseAddrPort(nc.RemoteAddr().String())
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

// clientKey is what per-client limits count: the address, or its /64 for
// IPv6, where one host commonly holds a whole /64.
func clientKey(ip netip.Addr) netip.Prefix {
	bits := 32
	if ip.Is6() {
		bits = 64
	}
	p, err := ip.Prefix(bits)
	if err != nil {
		return netip.Prefix{}
	}
	return p
}
