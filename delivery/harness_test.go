package delivery

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/internal/testpki"
	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/resolve"
)

// received is one message a test MX accepted.
type received struct {
	from     string
	mail     smtp.MailOptions
	rcpts    []string
	rcptOpts []smtp.RcptOptions
	data     string
	tls      bool
	resumed  bool   // the connection's TLS handshake resumed a session
	account  string // the AUTH user of the connection, at upstreams
}

// testMX is a go-smtp server on loopback whose answers each test sets.
type testMX struct {
	Addr string
	srv  *smtp.Server

	mu         sync.Mutex
	got        []received
	conns      map[*smtp.Conn]bool
	mails      map[*smtp.Conn]int // MAIL commands per connection, refused ones too
	serverName []string           // SNI of each TLS handshake
	// unwrapped counts the session tickets clients offered that this
	// server accepted for resumption.
	unwrapped int

	mailErr error
	rcptErr map[string]error
	// rcptHook runs before each RCPT reply; it may close the connection.
	rcptHook func(c *smtp.Conn, to string)
	dataHook func(c *smtp.Conn)
	// dataStall runs before the message is read.
	dataStall func()
	dataErr   error
}

type mxOption func(*smtp.Server)

func withTLS(cert tls.Certificate) mxOption {
	return func(s *smtp.Server) {
		s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
}

func newMX(t testing.TB, opts ...mxOption) *testMX {
	t.Helper()
	m := &testMX{rcptErr: map[string]error{}, conns: map[*smtp.Conn]bool{}, mails: map[*smtp.Conn]int{}}
	m.srv = smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		m.mu.Lock()
		m.conns[c] = true
		m.mu.Unlock()
		return &mxSession{m: m, c: c}, nil
	}))
	m.srv.Domain = "mx.test"
	m.srv.ReadTimeout = 10 * time.Second
	m.srv.WriteTimeout = 10 * time.Second
	for _, o := range opts {
		o(m.srv)
	}
	if m.srv.TLSConfig != nil {
		m.srv.TLSConfig.GetConfigForClient = func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			m.mu.Lock()
			m.serverName = append(m.serverName, h.ServerName)
			m.mu.Unlock()
			return nil, nil
		}
		cfg := m.srv.TLSConfig
		cfg.UnwrapSession = func(identity []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
			ss, err := cfg.DecryptTicket(identity, cs)
			if ss != nil {
				m.mu.Lock()
				m.unwrapped++
				m.mu.Unlock()
			}
			return ss, err
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m.Addr = l.Addr().String()
	go m.srv.Serve(endListener{l})
	t.Cleanup(func() {
		// Shutdown, not Close: go-smtp's Close races with a connection
		// still in its STARTTLS handler (go test -race sees it).
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		m.srv.Shutdown(ctx)
	})
	return m
}

func (m *testMX) messages() []received {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]received(nil), m.got...)
}

// tickets is how many session tickets the server accepted for resumption.
func (m *testMX) tickets() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.unwrapped
}

// sessionCount is how many connections reached EHLO.
func (m *testMX) sessionCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.conns)
}

// mostMails is the most MAIL commands one connection carried.
func (m *testMX) mostMails() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	most := 0
	for _, n := range m.mails {
		most = max(most, n)
	}
	return most
}

type mxSession struct {
	m   *testMX
	c   *smtp.Conn
	cur received
}

func (s *mxSession) Reset()        { s.cur = received{} }
func (s *mxSession) Logout() error { return nil }

func (s *mxSession) Mail(from string, opts *smtp.MailOptions) error {
	s.m.mu.Lock()
	err := s.m.mailErr
	s.m.mails[s.c]++
	s.m.mu.Unlock()
	if err != nil {
		return err
	}
	var cs tls.ConnectionState
	cs, s.cur.tls = s.c.TLSConnectionState()
	s.cur.resumed = cs.DidResume
	s.cur.from = from
	if opts != nil {
		s.cur.mail = *opts
	}
	return nil
}

func (s *mxSession) Rcpt(to string, opts *smtp.RcptOptions) error {
	s.m.mu.Lock()
	hook, err := s.m.rcptHook, s.m.rcptErr[to]
	s.m.mu.Unlock()
	if hook != nil {
		hook(s.c, to)
	}
	if err != nil {
		return err
	}
	s.cur.rcpts = append(s.cur.rcpts, to)
	if opts != nil {
		s.cur.rcptOpts = append(s.cur.rcptOpts, *opts)
	} else {
		s.cur.rcptOpts = append(s.cur.rcptOpts, smtp.RcptOptions{})
	}
	return nil
}

func (s *mxSession) Data(r io.Reader) error {
	s.m.mu.Lock()
	hook, err, stall := s.m.dataHook, s.m.dataErr, s.m.dataStall
	s.m.mu.Unlock()
	if stall != nil {
		stall()
	}
	b, rerr := io.ReadAll(r)
	if hook != nil {
		hook(s.c)
	}
	if rerr != nil {
		return rerr
	}
	if endedEarly(s.c) {
		return io.ErrUnexpectedEOF
	}
	if err != nil {
		return err
	}
	s.cur.data = string(b)
	s.m.mu.Lock()
	s.m.got = append(s.m.got, s.cur)
	s.m.mu.Unlock()
	return nil
}

// endListener's connections note when a read of the client's stream
// fails. go-smtp (v0.25.1) ends a BDAT message cleanly when the
// connection closes inside its LAST chunk; the test MX, like smtpin, does
// not store such a message, as a real MTA would not.
type endListener struct{ net.Listener }

func (l endListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &endConn{Conn: c}, nil
}

type endConn struct {
	net.Conn
	ended atomic.Bool
}

func (c *endConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if err != nil {
		c.ended.Store(true)
	}
	return n, err
}

func endedEarly(c *smtp.Conn) bool {
	nc := c.Conn()
	if tc, ok := nc.(*tls.Conn); ok {
		nc = tc.NetConn()
	}
	ec, ok := nc.(*endConn)
	return ok && ec.ended.Load()
}

// rawServer runs handle for every connection to a plain TCP listener, for
// remotes that do not speak SMTP properly.
func rawServer(t testing.TB, handle func(c net.Conn)) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return l.Addr().String()
}

// testEnv is a DNS server, a dialer that sends MX addresses to test
// servers, a CA and a recorder.
type testEnv struct {
	t    testing.TB
	dns  *dnstest.Server
	ca   *testpki.CA
	rec  *recorder
	logs *syncBuffer

	mu        sync.Mutex
	routes    map[string]string // MX address -> listener address
	blackhole map[string]bool
	closed    string // a loopback address where nothing listens
}

func newEnv(t testing.TB, records ...string) *testEnv {
	t.Helper()
	v := &testEnv{
		t:         t,
		dns:       dnstest.New(t, records...),
		ca:        testpki.NewCA(t),
		rec:       &recorder{},
		logs:      &syncBuffer{},
		routes:    map[string]string{},
		blackhole: map[string]bool{},
	}
	v.closed = refusingAddr(t)
	return v
}

// refusingAddr returns a loopback TCP address that refuses connections
// for the whole test: a socket bound there that never listens keeps the
// port from every listener, where a port merely freed could be handed to
// the next test's server and a "refused" connection reach it.
func refusingAddr(t testing.TB) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*syscall.SockaddrInet4).Port))
}

// route makes connections to ip (port 25) reach addr.
func (v *testEnv) route(ip, addr string) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.routes[ip] = addr
}

func (v *testEnv) dial(ctx context.Context, network, address string) (net.Conn, error) {
	host, port, err := net.SplitHostPort(address)
	if err != nil {
		return nil, errors.New("test dialer: " + address + ": " + err.Error())
	}
	if port != "25" {
		// A route's port: the test upstreams listen on 127.0.0.1 at
		// random ports, which the route names.
		if host != "127.0.0.1" {
			return nil, errors.New("test dialer: a port other than 25 only on 127.0.0.1: " + address)
		}
		var d net.Dialer
		return d.DialContext(ctx, network, address)
	}
	v.mu.Lock()
	target, ok := v.routes[host]
	hole := v.blackhole[host]
	v.mu.Unlock()
	if hole {
		<-ctx.Done()
		return nil, &net.OpError{Op: "dial", Net: network, Err: ctx.Err()}
	}
	if !ok {
		target = v.closed // a real "connection refused"
	}
	var d net.Dialer
	return d.DialContext(ctx, network, target)
}

// dialCounter counts the connections an engine opens, per MX address.
type dialCounter struct {
	v  *testEnv
	mu sync.Mutex
	n  map[string]int // MX address -> connections
}

func (d *dialCounter) dial(ctx context.Context, network, address string) (net.Conn, error) {
	host, _, _ := net.SplitHostPort(address)
	d.mu.Lock()
	if d.n == nil {
		d.n = map[string]int{}
	}
	d.n[host]++
	d.mu.Unlock()
	return d.v.dial(ctx, network, address)
}

// count is how many connections went to ip.
func (d *dialCounter) count(ip string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.n[ip]
}

// total is how many connections were opened.
func (d *dialCounter) total() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for _, c := range d.n {
		n += c
	}
	return n
}

func (v *testEnv) resolver() *resolve.Resolver {
	r, err := resolve.New(resolve.Config{Servers: []string{v.dns.Addr}, Timeout: 500 * time.Millisecond})
	if err != nil {
		v.t.Fatal(err)
	}
	return r
}

// options are the engine options every test starts from: short timeouts.
func (v *testEnv) options() Options {
	return Options{
		Hostname:       "relay.sender.test",
		Resolver:       v.resolver(),
		Recorder:       v.rec,
		DialContext:    v.dial,
		RootCAs:        v.ca.Pool,
		ConnectTimeout: 2 * time.Second,
		Timeouts: Timeouts{Greeting: 2 * time.Second, Command: 2 * time.Second, Mail: 2 * time.Second,
			Rcpt: 2 * time.Second, DataInit: 2 * time.Second, DataBlock: 2 * time.Second, DataFinal: 2 * time.Second},
		IdleTimeout: -1,
		Logger:      slog.New(slog.NewTextHandler(v.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
}

func (v *testEnv) engine(mod ...func(*Options)) *Engine {
	v.t.Helper()
	o := v.options()
	for _, m := range mod {
		m(&o)
	}
	e, err := New(o)
	if err != nil {
		v.t.Fatal(err)
	}
	v.t.Cleanup(func() { e.Close() })
	return e
}

const testBody = "From: sender@sender.test\r\nTo: rcpt@example.test\r\nSubject: test\r\n\r\nHello.\r\n.leading dot\r\n"

func testJob(domain string, rcpts ...string) *queue.Job {
	j := &queue.Job{
		ID:       "J1",
		Domain:   domain,
		Envelope: queue.Envelope{From: "sender@sender.test"},
		Size:     int64(len(testBody)),
		Arrived:  time.Now(),
		Attempt:  1,
		Open: func() (io.ReadCloser, error) {
			return io.NopCloser(strings.NewReader(testBody)), nil
		},
	}
	for _, r := range rcpts {
		p := queue.RecipientParams{Addr: r}
		j.Recipients = append(j.Recipients, p)
		j.Envelope.Recipients = append(j.Envelope.Recipients, p)
	}
	return j
}

func deliver(t testing.TB, e *Engine, job *queue.Job) []queue.Status {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	st := e.Deliver(ctx, job)
	if len(st) != len(job.Recipients) {
		t.Fatalf("Deliver returned %d statuses for %d recipients", len(st), len(job.Recipients))
	}
	return st
}

// wantStatus checks code, enhanced code and that text contains each part.
func wantStatus(t testing.TB, st queue.Status, code int, enhanced string, parts ...string) {
	t.Helper()
	if st.Code != code || st.Enhanced != enhanced {
		t.Errorf("status = %q, want %d %s", st.String(), code, enhanced)
		return
	}
	for _, p := range parts {
		if !strings.Contains(st.Text, p) {
			t.Errorf("status text %q does not contain %q", st.Text, p)
		}
	}
}

// attemptLines are the log's "delivery attempt" lines, in order.
func attemptLines(v *testEnv) []string {
	var out []string
	for _, l := range strings.Split(v.logs.String(), "\n") {
		if strings.Contains(l, "delivery attempt") {
			out = append(out, l)
		}
	}
	return out
}

// recorder keeps every policy.SessionResult.
type recorder struct {
	mu  sync.Mutex
	got []policy.SessionResult
}

func (r *recorder) Record(s policy.SessionResult) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.got = append(r.got, s)
}

func (r *recorder) results() []policy.SessionResult {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]policy.SessionResult(nil), r.got...)
}

// policyFunc is a policy.PolicySource from a function.
type policyFunc func(ctx context.Context, domain string, mxs []policy.MX) ([]policy.Requirement, error)

func (f policyFunc) Requirements(ctx context.Context, domain string, mxs []policy.MX) ([]policy.Requirement, error) {
	return f(ctx, domain, mxs)
}

// everyMX gives every MX host the same requirement, with Names = the MX name.
func everyMX(req policy.Requirement) policy.PolicySource {
	return policyFunc(func(_ context.Context, _ string, mxs []policy.MX) ([]policy.Requirement, error) {
		out := make([]policy.Requirement, len(mxs))
		for i, mx := range mxs {
			out[i] = req
			if req.Security == policy.SecurityVerify && len(req.Names) == 0 {
				out[i].Names = []string{mx.Name}
			}
		}
		return out, nil
	})
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type (
	ctxT       = context.Context
	statusT    = queue.Status
	smtpServer = smtp.Server
)

// testEnvCA is a CA of its own, for certificates only opportunistic TLS accepts.
func testEnvCA(t *testing.T) *testpki.CA { return testpki.NewCA(t) }

// Policy identities for requirements that tests hand to the engine.
var (
	testSTS   = policy.NewIdentity(policy.TypeSTS, "example.test", []string{"version: STSv1", "mode: enforce", "mx: *.example.test", "max_age: 86400"}, []string{"*.example.test"})
	testTLSA  = policy.NewIdentity(policy.TypeTLSA, "example.test", []string{"3 1 1 00"}, nil)
	testLocal = policy.NewIdentity(policy.TypeLocal, "example.test", nil, nil)
)

// The harness's refused address stays refused: a listener cannot take its
// port.
func TestRefusingAddrRefusesAndKeepsItsPort(t *testing.T) {
	addr := refusingAddr(t)
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Fatalf("dial %s: connected, want refused", addr)
	}
	if l, err := net.Listen("tcp", addr); err == nil {
		l.Close()
		t.Fatalf("listen on %s: the port was free to take", addr)
	}
}
