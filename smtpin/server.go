package smtpin

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"
	"golang.org/x/time/rate"

	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/routing"
)

// Enqueuer stores a submitted message. queue.Queue implements it.
type Enqueuer interface {
	// Enqueue stores env and body (the full message, CRLF line ends) durably
	// and returns its queue id. When it returns an error nothing is stored.
	// It reads body only until it returns: the buffers behind body are
	// used again for the next message. body is a queue.Body8BitReporter.
	Enqueue(ctx context.Context, env queue.Envelope, body io.Reader) (id string, err error)
}

// Options configure a Server. Zero values get the defaults noted.
type Options struct {
	Hostname  string // announced in the greeting and the Received header
	Listen    string // plain submission with STARTTLS, "" = off (":587")
	ListenTLS string // implicit TLS submission (RFC 8314), "" = off (":465")

	// GetCertificate supplies the server certificate for STARTTLS and
	// implicit TLS (CertStore.GetCertificate); nil means no TLS at all.
	GetCertificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	// SessionTickets enables TLS session resumption by tickets. Off by
	// default: Go's tickets break STARTTLS with some Outlook versions, and a
	// submission client gains little from resumption.
	SessionTickets bool

	// TrustedNetworks may relay without AUTH (the Postfix relayhost case)
	// and may AUTH without TLS.
	TrustedNetworks []netip.Prefix
	// InsecureAuthFromLoopback lets clients on 127.0.0.0/8 and ::1 use AUTH
	// without TLS, as the password does not cross a network. main sets it;
	// tests leave it off to see the refusal over 127.0.0.1.
	InsecureAuthFromLoopback bool

	Users        []User
	ShowAuthUser bool // name the authenticated user in the Received header
	// Postmaster is where "RCPT TO:<Postmaster>", without a domain, goes
	// (RFC 5321 §4.5.1: every relay takes it); "" = postmaster@Hostname,
	// as Postfix's postmaster@$myorigin. Only clients that may relay get
	// this far.
	Postmaster string
	// Failed AUTH attempts per client IP (IPv6: per /64) and user name:
	// AuthFailures in a burst, then one more per AuthFailuresPer; beyond
	// that AUTH for that name is answered 454 4.7.0. AuthFailuresPerIP is
	// the burst for the client over all names. Each failure is also
	// delayed 1s.
	AuthFailures      int
	AuthFailuresPerIP int
	AuthFailuresPer   time.Duration

	// MaxMessageSize in bytes; larger is 552 5.3.4: at MAIL when its SIZE
	// parameter says so (RFC 1870), else as soon as the message passes the
	// limit. A message of exactly this size is accepted.
	MaxMessageSize int64
	MaxRecipients  int // per message; more is 452 4.5.3
	// MaxHops is how many Received fields a message may carry; more is a
	// mail loop (RFC 5321 §6.3), refused with 554 5.4.6.
	MaxHops int
	// MaxLineLength in bytes with CRLF, for commands: RFC 5321
	// §4.5.3.1.6 says 512, but SMTPUTF8 and AUTH lines run longer.
	// Message lines are held to RFC 5321's 1000 (or this, if smaller).
	MaxLineLength int
	MaxConnsPerIP int // concurrent connections per client IP (IPv6: per /64)
	// MaxConns caps concurrent connections in all, so that a flood from
	// many addresses cannot use up file descriptors. Beyond it new clients
	// get 421 4.3.2; trusted networks are still let in.
	MaxConns int

	// CommandTimeout is how long a client may stay silent while a command
	// is expected (RFC 5321 §4.5.3.2.7: at least 5 minutes). DataTimeout is
	// how long it may stay silent while sending a message. Both are idle
	// timeouts: each read restarts them.
	CommandTimeout, DataTimeout time.Duration

	Logger *slog.Logger // nil = slog.Default()
}

// Defaults for zero Options fields, and of the [submission] keys in
// stsrelay's configuration, which takes them from here.
const (
	DefaultMaxMessageSize    = 35 << 20
	DefaultMaxRecipients     = 1000
	DefaultMaxHops           = 100 // RFC 5321 §6.3: "normally at least 100"
	DefaultMaxLineLength     = 2000
	DefaultMaxConnsPerIP     = 20
	DefaultAuthFailures      = 5
	DefaultAuthFailuresPerIP = 20
	DefaultAuthFailuresPer   = time.Minute
	DefaultCommandTimeout    = 5 * time.Minute
	DefaultDataTimeout       = 10 * time.Minute
	DefaultMaxConns          = 1000
)

// ErrServerClosed is returned by Serve and Listen after Shutdown.
var ErrServerClosed = errors.New("smtpin: server closed")

// Server is the submission listener.
type Server struct {
	opts    Options
	q       Enqueuer
	log     *slog.Logger
	smtp    *smtp.Server
	tlsConf *tls.Config
	users   atomic.Pointer[userDB]
	authLim *authLimiter

	// authFailDelay slows down password guessing; tests shorten it.
	authFailDelay time.Duration

	baseCtx    context.Context // for Enqueue; cancelled when Shutdown gives up
	cancelBase context.CancelFunc

	connSeq atomic.Uint64
	// maxUnanswered is how much a client may send before it must wait
	// for a reply: a whole message, dot-stuffed (at most 4/3 of its size),
	// with room to spare for the rest of a rejected one.
	maxUnanswered int64
	// refusalLog rate-limits the log lines of refused connections.
	refusalLog logLimit

	mu        sync.Mutex
	plainLn   net.Listener
	tlsLn     net.Listener
	conns     map[*conn]struct{}
	perIP     map[netip.Prefix]int
	draining  atomic.Bool
	stopped   bool // Shutdown gave up: no more Enqueue calls
	enqueuing int  // Enqueue calls in progress
	serving   bool
	closed    bool
	serveDone chan struct{}
}

// New checks opts and returns a Server that stores accepted mail with q.
// Call Listen, then Serve.
func New(opts Options, q Enqueuer) (*Server, error) {
	if q == nil {
		return nil, errors.New("smtpin: no queue")
	}
	if opts.Hostname == "" {
		return nil, errors.New("submission: hostname is empty")
	}
	if opts.Listen == "" && opts.ListenTLS == "" {
		return nil, errors.New("submission: neither listen nor listen_tls is set")
	}
	if opts.ListenTLS != "" && opts.GetCertificate == nil {
		return nil, fmt.Errorf("submission.listen_tls = %q needs a certificate (tls_cert, tls_key)", opts.ListenTLS)
	}
	if opts.Postmaster == "" {
		opts.Postmaster = "postmaster@" + opts.Hostname
	}
	// In A-labels, so that a client without SMTPUTF8 reaches it too.
	if local, domain, ok := strings.Cut(opts.Postmaster, "@"); ok && routing.ALabels(domain) != "" {
		opts.Postmaster = local + "@" + routing.ALabels(domain)
	}
	if _, err := parseMailbox(opts.Postmaster, false); err != nil || !strings.Contains(opts.Postmaster, "@") {
		return nil, fmt.Errorf("submission: postmaster %q is not an ASCII address: %v", opts.Postmaster, err)
	}
	if opts.MaxMessageSize <= 0 {
		opts.MaxMessageSize = DefaultMaxMessageSize
	}
	if opts.MaxRecipients <= 0 {
		opts.MaxRecipients = DefaultMaxRecipients
	}
	if opts.MaxLineLength <= 0 {
		opts.MaxLineLength = DefaultMaxLineLength
	}
	if opts.MaxHops <= 0 {
		opts.MaxHops = DefaultMaxHops
	}
	if opts.MaxConnsPerIP <= 0 {
		opts.MaxConnsPerIP = DefaultMaxConnsPerIP
	}
	if opts.MaxConns <= 0 {
		opts.MaxConns = DefaultMaxConns
	}
	if opts.AuthFailures <= 0 {
		opts.AuthFailures = DefaultAuthFailures
	}
	if opts.AuthFailuresPerIP <= 0 {
		opts.AuthFailuresPerIP = DefaultAuthFailuresPerIP
	}
	if opts.AuthFailuresPer <= 0 {
		opts.AuthFailuresPer = DefaultAuthFailuresPer
	}
	if opts.CommandTimeout <= 0 {
		opts.CommandTimeout = DefaultCommandTimeout
	}
	if opts.DataTimeout <= 0 {
		opts.DataTimeout = DefaultDataTimeout
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	trusted := make([]netip.Prefix, len(opts.TrustedNetworks))
	for i, p := range opts.TrustedNetworks {
		trusted[i] = p.Masked()
	}
	opts.TrustedNetworks = trusted

	s := &Server{
		opts:          opts,
		q:             q,
		log:           opts.Logger,
		authLim:       newAuthLimiter(opts.AuthFailures, opts.AuthFailuresPerIP, opts.AuthFailuresPer),
		authFailDelay: time.Second,
		maxUnanswered: 2*opts.MaxMessageSize + 64<<10,
		refusalLog:    newLogLimit(rate.Every(time.Second), 5, "also_refused_unlogged"),
		conns:         make(map[*conn]struct{}),
		perIP:         make(map[netip.Prefix]int),
		serveDone:     make(chan struct{}),
	}
	s.baseCtx, s.cancelBase = context.WithCancel(context.Background())
	if err := s.SetUsers(opts.Users); err != nil {
		return nil, err
	}

	if opts.GetCertificate != nil {
		s.tlsConf = &tls.Config{
			MinVersion:             tls.VersionTLS12,
			GetCertificate:         opts.GetCertificate,
			SessionTicketsDisabled: !opts.SessionTickets,
		}
	}

	srv := smtp.NewServer(backend{s})
	srv.Domain = opts.Hostname
	srv.TLSConfig = s.tlsConf
	// go-smtp's own size limit is left off: v0.25.1 (and v0.26.0) refuses
	// a DATA message of exactly the limit, and drains an oversized BDAT
	// chunk without bound. smtpin checks MAIL's SIZE and counts the
	// message itself; EHLO then announces SIZE without a number, which
	// RFC 1870 §4 allows, and clients still learn the limit at MAIL.
	srv.MaxMessageBytes = 0
	srv.MaxRecipients = opts.MaxRecipients
	srv.MaxLineLength = opts.MaxLineLength
	// Read deadlines are set per read by conn, so that DATA gets its own
	// timeout and Shutdown can wake idle sessions; writes use go-smtp's.
	srv.ReadTimeout = 0
	srv.WriteTimeout = opts.CommandTimeout
	// Whether AUTH is allowed without TLS is decided per client in
	// session.Auth; go-smtp's own switch is server-wide.
	srv.AllowInsecureAuth = true
	srv.EnableSMTPUTF8 = true
	srv.EnableREQUIRETLS = true // go-smtp offers it on TLS connections only
	srv.EnableDSN = true
	// A pipelining client (Postfix in front, say) gets the replies to its
	// MAIL and RCPT commands in one packet (RFC 2920 §3.2 (10)); our own
	// checks at MAIL and RCPT take no time worth timing separately.
	srv.GroupPipelinedReplies = true
	srv.ErrorLog = newSlogPrinter(s.log)
	s.smtp = srv
	return s, nil
}

// Listen binds the configured addresses. An error names the address, so
// that "address already in use" is reported before the service is ready.
func (s *Server) Listen() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrServerClosed
	}
	if s.plainLn != nil || s.tlsLn != nil {
		return errors.New("smtpin: Listen called twice")
	}
	if s.opts.Listen != "" {
		l, err := net.Listen("tcp", s.opts.Listen)
		if err != nil {
			return fmt.Errorf("submission.listen: %w", err) // names the address
		}
		s.plainLn = l
	}
	if s.opts.ListenTLS != "" {
		l, err := net.Listen("tcp", s.opts.ListenTLS)
		if err != nil {
			if s.plainLn != nil {
				s.plainLn.Close()
				s.plainLn = nil
			}
			return fmt.Errorf("submission.listen_tls: %w", err)
		}
		s.tlsLn = l
	}
	if s.opts.GetCertificate == nil {
		s.log.Warn("submission: no TLS certificate: STARTTLS is not offered and AUTH works only from trusted networks or loopback")
	}
	return nil
}

// Addr is the bound address of the plain (STARTTLS) listener, nil if none.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.plainLn == nil {
		return nil
	}
	return s.plainLn.Addr()
}

// TLSAddr is the bound address of the implicit TLS listener, nil if none.
func (s *Server) TLSAddr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.tlsLn == nil {
		return nil
	}
	return s.tlsLn.Addr()
}

// Serve accepts connections on the listeners bound by Listen until
// Shutdown, then returns nil; it returns an error if a listener fails.
func (s *Server) Serve() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrServerClosed
	}
	if s.serving {
		s.mu.Unlock()
		return errors.New("smtpin: Serve called twice")
	}
	if s.plainLn == nil && s.tlsLn == nil {
		s.mu.Unlock()
		return errors.New("smtpin: Serve before Listen")
	}
	s.serving = true
	var lns []net.Listener
	if s.plainLn != nil {
		lns = append(lns, &listener{Listener: s.plainLn, srv: s, name: "submission"})
	}
	if s.tlsLn != nil {
		l := &listener{Listener: s.tlsLn, srv: s, name: "submissions", implicitTLS: true}
		lns = append(lns, tls.NewListener(l, s.tlsConf))
	}
	s.mu.Unlock()
	defer close(s.serveDone)

	errc := make(chan error, len(lns))
	for _, l := range lns {
		go func() {
			err := s.smtp.Serve(l)
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed && errors.Is(err, net.ErrClosed) {
				err = nil
			} else if err != nil {
				// One listener failed: close all, so that Serve returns.
				s.closeListeners()
				err = fmt.Errorf("submission listener %s: %w", l.Addr(), err)
			}
			errc <- err
		}()
	}
	var first error
	for range lns {
		if err := <-errc; err != nil && first == nil {
			first = err
		}
	}
	return first
}

func (s *Server) closeListeners() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range []net.Listener{s.plainLn, s.tlsLn} {
		if l != nil {
			l.Close()
		}
	}
}

// Shutdown stops accepting connections, ends sessions that are waiting for
// a command (they get "421") and lets message transfers finish until ctx is
// done; then it closes what is left and returns ctx.Err().
//
// go-smtp's own Shutdown is not used: it waits for idle clients to QUIT and
// cannot close them once its context expires.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.closed = true
	s.draining.Store(true)
	serving := s.serving
	for _, l := range []net.Listener{s.plainLn, s.tlsLn} {
		if l != nil {
			l.Close()
		}
	}
	for c := range s.conns {
		c.wake()
	}
	s.mu.Unlock()
	defer s.cancelBase()

	for s.connCount() > 0 {
		select {
		case <-ctx.Done():
			s.mu.Lock()
			s.stopped = true
			for c := range s.conns {
				c.Conn.Close()
			}
			s.mu.Unlock()
			// Let cancelled Enqueue calls return, so that the caller may
			// close the queue once Shutdown has returned, and give the
			// sessions a moment to notice their closed connections.
			s.cancelBase()
			for s.enqueueCount() > 0 {
				time.Sleep(10 * time.Millisecond)
			}
			for end := time.Now().Add(2 * time.Second); s.connCount() > 0 && time.Now().Before(end); {
				time.Sleep(10 * time.Millisecond)
			}
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	if serving {
		select {
		case <-s.serveDone:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

func (s *Server) connCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

func (s *Server) enqueueBegin() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped {
		return false
	}
	s.enqueuing++
	return true
}

func (s *Server) enqueueEnd() {
	s.mu.Lock()
	s.enqueuing--
	s.mu.Unlock()
}

func (s *Server) enqueueCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.enqueuing
}

// slogPrinter gives go-smtp's internal log to slog. Most of it is failed
// TLS handshakes and dropped connections, which scanners cause all day;
// panics it recovered from are errors. None is known that a client can
// provoke (the one go-smtp v0.25.1 had, commands pipelined after "Too
// many errors", is fixed in third_party/go-smtp), but should one turn up
// their stack traces are rate-limited: a flood of them must not become a
// flood of log. The rest is limited as refused connections are: a scanner
// opening hundreds of connections to the TLS port gets a few lines.
type slogPrinter struct {
	log    *slog.Logger
	panics logLimit
	others logLimit
}

func newSlogPrinter(log *slog.Logger) slogPrinter {
	return slogPrinter{log: log, panics: newLogLimit(rate.Every(time.Minute), 3, "also_recovered_unlogged"),
		others: newLogLimit(rate.Every(time.Second), 5, "also_unlogged")}
}

func (p slogPrinter) Printf(format string, v ...any) { p.print(fmt.Sprintf(format, v...)) }

func (p slogPrinter) Println(v ...any) { p.print(fmt.Sprint(v...)) }

func (p slogPrinter) print(msg string) {
	if !strings.HasPrefix(msg, "panic") {
		if attrs, ok := p.others.allow(); ok {
			p.log.Info("smtpin: "+msg, attrs...)
		}
		return
	}
	metricPanics.Inc()
	if attrs, ok := p.panics.allow(); ok {
		p.log.Error("smtpin: "+msg, attrs...)
	}
}

// logLimit lets a few log lines through and counts the rest, which the
// next line let through names under key.
type logLimit struct {
	lim      *rate.Limiter
	unlogged *atomic.Int64
	key      string
}

func newLogLimit(r rate.Limit, burst int, key string) logLimit {
	return logLimit{lim: rate.NewLimiter(r, burst), unlogged: new(atomic.Int64), key: key}
}

// allow says whether a line may go out now, and the attributes it adds.
func (l logLimit) allow() ([]any, bool) {
	if !l.lim.Allow() {
		l.unlogged.Add(1)
		return nil, false
	}
	if n := l.unlogged.Swap(0); n > 0 {
		return []any{l.key, n}, true
	}
	return nil, true
}
