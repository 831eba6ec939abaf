package delivery

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// upstream is a go-smtp server on 127.0.0.1 at a random port, playing a
// smart host: STARTTLS or implicit TLS or neither, AUTH or not. It counts
// the connections it has open at once, as a provider limiting us would.
type upstream struct {
	Port int
	srv  *smtp.Server

	mu       sync.Mutex
	accounts map[string]string // user → password
	mechs    []string          // offered AUTH mechanisms; nil: no AUTH
	authErr  error             // replaces the password check's result when set
	auths    []string          // "user:password:tls" of each AUTH attempt
	got      []received
	sessions int // go-smtp sessions: one per EHLO before and after STARTTLS
	accepted int // connections taken
	open     int // connections open now
	maxOpen  int // the most open at once
	refused  int // connections answered with 421
	limit    int // > 0: a connection beyond this many open gets a 421 greeting
	gate     chan struct{}
}

type upOption func(*upstream)

// upSTARTTLS offers STARTTLS with cert.
func upSTARTTLS(cert tls.Certificate) upOption {
	return func(u *upstream) { u.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}} }
}

// upAuth asks for user and pass, offering PLAIN and LOGIN.
func upAuth(user, pass string) upOption {
	return func(u *upstream) {
		if u.accounts == nil {
			u.accounts = map[string]string{}
		}
		u.accounts[user] = pass
		u.mechs = []string{sasl.Plain, sasl.Login}
	}
}

// newUpstream starts a plaintext or STARTTLS upstream; with implicit set,
// one that speaks TLS from the first byte with cert.
func newUpstream(t testing.TB, implicit *tls.Certificate, opts ...upOption) *upstream {
	t.Helper()
	u := &upstream{}
	u.srv = smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		u.mu.Lock()
		u.sessions++
		u.mu.Unlock()
		return &upSession{u: u, c: c}, nil
	}))
	u.srv.Domain = "smtp.provider.test"
	u.srv.ReadTimeout = 10 * time.Second
	u.srv.WriteTimeout = 10 * time.Second
	// Whether AUTH is allowed without TLS is the client's decision here:
	// the server would take a password in the clear.
	u.srv.AllowInsecureAuth = true
	for _, o := range opts {
		o(u)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u.Port = l.Addr().(*net.TCPAddr).Port
	if implicit != nil {
		l = tls.NewListener(l, &tls.Config{Certificates: []tls.Certificate{*implicit}})
	} else {
		l = &countingListener{Listener: l, u: u}
	}
	go u.srv.Serve(l)
	t.Cleanup(func() {
		u.release()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		u.srv.Shutdown(ctx)
	})
	return u
}

// nexthop is the route target of u: "[127.0.0.1]:port".
func (u *upstream) nexthop() string { return "[127.0.0.1]:" + strconv.Itoa(u.Port) }

// hold makes every MAIL wait until release.
func (u *upstream) hold() {
	u.mu.Lock()
	u.gate = make(chan struct{})
	u.mu.Unlock()
}

func (u *upstream) release() {
	u.mu.Lock()
	if u.gate != nil {
		close(u.gate)
		u.gate = nil
	}
	u.mu.Unlock()
}

// stats returns the connections open now, the most open at once, those
// refused with 421, and all connections taken (plaintext and STARTTLS
// upstreams only).
func (u *upstream) stats() (open, maxOpen, refused, accepted int) {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.open, u.maxOpen, u.refused, u.accepted
}

func (u *upstream) authAttempts() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]string(nil), u.auths...)
}

func (u *upstream) messages() []received {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]received(nil), u.got...)
}

// waitFor polls cond until it holds; a condition that never holds fails
// the test after a generous bound (this checks a state, not a speed).
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for range 1000 {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

// countingListener counts open connections and refuses, with a 421
// greeting, those beyond the upstream's limit.
type countingListener struct {
	net.Listener
	u *upstream
}

func (l *countingListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		u := l.u
		u.mu.Lock()
		if u.limit > 0 && u.open >= u.limit {
			u.refused++
			u.mu.Unlock()
			io.WriteString(c, "421 4.7.0 smtp.provider.test Error: too many connections from 127.0.0.1\r\n")
			c.Close()
			continue
		}
		u.open++
		u.accepted++
		u.maxOpen = max(u.maxOpen, u.open)
		u.mu.Unlock()
		return &countedConn{Conn: c, u: u}, nil
	}
}

// countedConn stops counting when the server says 221 to QUIT, before the
// client can see it: the client's next connection must not overlap it in
// the count (the server closes the socket a moment later).
type countedConn struct {
	net.Conn
	u    *upstream
	once sync.Once
}

func (c *countedConn) done() {
	c.once.Do(func() {
		c.u.mu.Lock()
		c.u.open--
		c.u.mu.Unlock()
	})
}

func (c *countedConn) Write(p []byte) (int, error) {
	if bytes.HasPrefix(p, []byte("221 ")) {
		c.done()
	}
	return c.Conn.Write(p)
}

func (c *countedConn) Close() error {
	c.done()
	return c.Conn.Close()
}

type upSession struct {
	u       *upstream
	c       *smtp.Conn
	cur     received
	authed  bool
	account string // who logged in on this connection
}

var _ smtp.AuthSession = (*upSession)(nil)

func (s *upSession) AuthMechanisms() []string {
	s.u.mu.Lock()
	defer s.u.mu.Unlock()
	return s.u.mechs
}

func (s *upSession) Auth(mech string) (sasl.Server, error) {
	check := func(user, pass string) error {
		_, isTLS := s.c.TLSConnectionState()
		s.u.mu.Lock()
		defer s.u.mu.Unlock()
		s.u.auths = append(s.u.auths, fmt.Sprintf("%s:%s:%t", user, pass, isTLS))
		if s.u.authErr != nil {
			return s.u.authErr
		}
		if want, ok := s.u.accounts[user]; !ok || pass != want {
			return smtp.ErrAuthFailed
		}
		s.authed, s.cur.from = true, ""
		s.account = user
		return nil
	}
	switch mech {
	case sasl.Plain:
		return sasl.NewPlainServer(func(_, user, pass string) error { return check(user, pass) }), nil
	case sasl.Login:
		return &loginServer{check: check}, nil
	}
	return nil, smtp.ErrAuthUnknownMechanism
}

// loginServer is the server side of AUTH LOGIN, which go-sasl lacks.
type loginServer struct {
	check    func(user, pass string) error
	user     string
	haveUser bool
}

func (l *loginServer) Next(resp []byte) ([]byte, bool, error) {
	if !l.haveUser {
		if resp == nil {
			return []byte("Username:"), false, nil
		}
		l.user, l.haveUser = string(resp), true
		return []byte("Password:"), false, nil
	}
	if resp == nil {
		return nil, false, errors.New("no password")
	}
	return nil, true, l.check(l.user, string(resp))
}

func (s *upSession) Reset()        { s.cur = received{} }
func (s *upSession) Logout() error { return nil }

func (s *upSession) Mail(from string, opts *smtp.MailOptions) error {
	s.u.mu.Lock()
	gate, needAuth := s.u.gate, len(s.u.mechs) > 0
	s.u.mu.Unlock()
	if gate != nil {
		<-gate
	}
	if needAuth && !s.authed {
		return smtp.ErrAuthRequired
	}
	_, s.cur.tls = s.c.TLSConnectionState()
	s.cur.from = from
	s.cur.account = s.account
	return nil
}

func (s *upSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	s.cur.rcpts = append(s.cur.rcpts, to)
	return nil
}

func (s *upSession) Data(r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	s.cur.data = string(b)
	s.u.mu.Lock()
	s.u.got = append(s.u.got, s.cur)
	s.u.mu.Unlock()
	return nil
}
