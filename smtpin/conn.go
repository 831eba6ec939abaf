package smtpin

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// listener admits connections: it counts them per client and refuses a
// client over MaxConnsPerIP, unless trusted, before go-smtp sees it.
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
	// connections as its own concurrency limit allows (20 by default).
	trusted := s.isTrusted(ip)
	s.mu.Lock()
	over := !trusted && s.perIP[key] >= s.opts.MaxConnsPerIP
	if !over {
		s.perIP[key]++
	}
	s.mu.Unlock()

	if over {
		metricConnections.WithLabelValues(listenerName, "too_many").Inc()
		s.log.Warn("smtpin: connection refused: too many connections from client",
			"client", ip, "limit", s.opts.MaxConnsPerIP)
		go func() {
			if !implicitTLS {
				// Before TLS there is nobody to talk to on port 465; on
				// 587 the client learns why (RFC 5321 §3.8: 421 at greeting).
				nc.SetWriteDeadline(time.Now().Add(10 * time.Second))
				fmt.Fprintf(nc, "421 4.7.0 %s too many connections from %s, try again later\r\n", s.opts.Hostname, ip)
			}
			nc.Close()
		}()
		return nil
	}

	metricConnections.WithLabelValues(listenerName, "accepted").Inc()
	c := &conn{Conn: nc, srv: s, ip: ip, key: key, id: s.connSeq.Add(1)}
	s.log.Debug("smtpin: connected", "conn", c.id, "client", ip, "listener", listenerName)
	s.mu.Lock()
	s.conns[c] = struct{}{}
	s.mu.Unlock()
	return c
}

// conn is a client connection. Every read gets a fresh deadline: the
// command timeout, or the data timeout while a message is coming in.
type conn struct {
	net.Conn
	srv *Server
	ip  netip.Addr
	key netip.Prefix
	id  uint64 // in log lines, to tell one client's sessions apart

	inData    atomic.Bool
	expired   atomic.Bool // a read timed out during DATA: end the session now
	mu        sync.Mutex  // orders deadline updates against wake
	closeOnce sync.Once
}

func (c *conn) Read(b []byte) (int, error) {
	c.mu.Lock()
	d := c.srv.opts.CommandTimeout
	if c.inData.Load() {
		d = c.srv.opts.DataTimeout
	}
	deadline := time.Now().Add(d)
	if c.expired.Load() || c.srv.isDraining() && !c.inData.Load() {
		// Shutting down, or the client stalled in DATA: the next read fails,
		// so go-smtp does not wait a command timeout to discard the rest.
		deadline = time.Now()
	}
	err := c.Conn.SetReadDeadline(deadline)
	c.mu.Unlock()
	if err != nil {
		return 0, err
	}
	return c.Conn.Read(b)
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
	c.closeOnce.Do(func() {
		s := c.srv
		s.mu.Lock()
		delete(s.conns, c)
		if s.perIP[c.key]--; s.perIP[c.key] <= 0 {
			delete(s.perIP, c.key)
		}
		s.mu.Unlock()
	})
	return c.Conn.Close()
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
