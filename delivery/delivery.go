// Package delivery sends queued messages to the MX hosts of their
// recipients' domains: it routes (RFC 5321 §5.1, RFC 7505), asks a
// policy.PolicySource which TLS each MX host needs (MTA-STS RFC 8461, DANE
// RFC 7672, local overrides), runs the SMTP client session and turns every
// reply into a per-recipient queue.Status (docs/DESIGN.md, "What deferrals say").
//
// Messages go out exactly as they were queued; delivery never rewrites
// them (a rewrite would break DKIM signatures), except the queue's own
// DSNs, which go 7-bit (queue.SevenBitDSN) to a host without 8BITMIME
// since they cannot return. A message the next hop
// cannot take as it is goes to the next MX host, and when none can, it
// returns to its sender: 8-bit content to hosts without 8BITMIME with
// 550 5.6.3 (RFC 6152 §3 allows returning instead of converting to 7-bit
// MIME), a message needing SMTPUTF8 with 5.6.7 (RFC 6531 §3.4), a
// REQUIRETLS one with 5.7.30 (RFC 8689). Recipients a host defers (4xx)
// go to the next MX host in the same attempt, unless the connection
// failed once the whole message was out (docs/DESIGN.md, "Refusals and
// the next host"). EHLO keywords are matched without regard to case
// (RFC 5321 §2.4). When the next hop supports DSN,
// NOTIFY goes on with the message and that hop sends any success notice;
// a Status is marked Relayed only when NOTIFY=SUCCESS could not go on
// (RFC 3461 §5.2.1, §5.2.2).
//
// New connections to an MX host resume an earlier TLS session when the
// host allows it. The certificate check of the connection's requirement
// still runs, on the chain of the session resumed (crypto/tls calls
// VerifyConnection on resumed handshakes too), so resumption saves
// handshake work and never a check (docs/DESIGN.md, "TLS session
// resumption").
//
// A remote that offers PIPELINING gets MAIL, every RCPT and DATA in one
// write, and the replies are read afterwards in order (RFC 2920 §3.1); the
// body follows only a 354, and a 354 with every recipient refused gets the
// lone ".". Other remotes get one command per round trip. Both paths give
// the same per-recipient statuses.
package delivery

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/resolve"
)

// Options configure an Engine. Hostname and Resolver are required.
type Options struct {
	// Hostname is our EHLO name. An MX target equal to it marks where the
	// route must stop, so mail never loops back to us (RFC 5321 §5.1).
	Hostname string
	// Resolver answers every DNS question (MX, A/AAAA).
	Resolver *resolve.Resolver
	// Policy decides each MX host's TLS requirement; nil means
	// opportunistic TLS for every host.
	Policy policy.PolicySource
	// Overrides are the [[delivery.policy]] entries, applied over Policy
	// (see Override for the precedence rules).
	Overrides []Override
	// Routes are the [[delivery.route]] entries; a domain no route
	// matches goes to its MX hosts.
	Routes []Route
	// Limits are the [[delivery.limits]] entries.
	Limits []Limit
	// Recorder receives one policy.SessionResult per TLS session attempt; nil
	// records nothing.
	Recorder policy.Recorder

	// DialContext opens connections; nil means a net.Dialer. Tests use it
	// to send every MX address to loopback.
	DialContext func(ctx context.Context, network, address string) (net.Conn, error)
	// RootCAs verifies certificates under policy.SecurityVerify; nil means the
	// system roots.
	RootCAs *x509.CertPool
	// IPVersion restricts the address families dialed
	// (delivery.ip_version).
	IPVersion resolve.IPVersion

	// ConnectTimeout bounds one TCP connect; 0 means DefaultConnectTimeout.
	ConnectTimeout time.Duration
	// Timeouts bound each SMTP step; zero fields take the RFC 5321
	// §4.5.3.2 values.
	Timeouts Timeouts
	// IdleTimeout is how long a connection waits in the cache for the next
	// message to the same domain; 0 means 10 seconds, negative disables
	// connection reuse.
	IdleTimeout time.Duration
	// MaxConnsPerDomain bounds simultaneous connections to one
	// destination (a recipient domain, a route's nexthop, or the hosts of
	// an mx_hosts limit) that no Shaping limits otherwise; 0 means
	// DefaultMaxConnsPerDomain. Deliver waits for a free slot, or for ctx.
	MaxConnsPerDomain int
	// ThrottleFor is how long a destination that answered "too many
	// connections" (a 421 greeting or reply to EHLO) keeps its lowered
	// concurrency; 0 means 5 minutes.
	ThrottleFor time.Duration
	// TLSSessionCacheSize bounds the TLS sessions remembered for
	// resumption, one per MX host name; 0 means
	// DefaultTLSSessionCacheSize, negative turns resumption off.
	TLSSessionCacheSize int
	// NoChunking sends every message with DATA, never with BDAT
	// (RFC 3030), even to remotes that offer CHUNKING and PIPELINING.
	NoChunking bool

	// Logger gets one line per delivery attempt; nil means slog.Default().
	Logger *slog.Logger
	// Now is the clock, for certificate checks and records; nil means
	// time.Now.
	Now func() time.Time
}

// Defaults for zero Options fields, and of the [delivery] keys in
// stsrelay's configuration, which takes them from here.
const (
	DefaultConnectTimeout    = 30 * time.Second
	DefaultMaxConnsPerDomain = 10
	// DefaultTLSSessionCacheSize keeps one session per MX host name for
	// the 1,024 hosts used last: a ticket and the chain it was made with,
	// a few KiB each.
	DefaultTLSSessionCacheSize = 1024
)

// Timeouts bound each step of an SMTP session. RFC 5321 §4.5.3.2 gives the
// defaults used for zero fields.
type Timeouts struct {
	Greeting  time.Duration // initial 220: 5 minutes
	Command   time.Duration // EHLO, STARTTLS and the TLS handshake, RSET, QUIT: 5 minutes
	Mail      time.Duration // MAIL: 5 minutes
	Rcpt      time.Duration // RCPT: 5 minutes
	DataInit  time.Duration // DATA until 354: 2 minutes
	DataBlock time.Duration // each write of the message: 3 minutes
	DataFinal time.Duration // final "." until its reply: 10 minutes
}

func (t Timeouts) withDefaults() Timeouts {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&t.Greeting, 5*time.Minute)
	def(&t.Command, 5*time.Minute)
	def(&t.Mail, 5*time.Minute)
	def(&t.Rcpt, 5*time.Minute)
	def(&t.DataInit, 2*time.Minute)
	def(&t.DataBlock, 3*time.Minute)
	def(&t.DataFinal, 10*time.Minute)
	return t
}

// Engine delivers jobs. It implements queue.Deliverer and is safe for
// concurrent use.
type Engine struct {
	opts     Options
	hostname string // canonical, no trailing dot
	tables   atomic.Pointer[tables]
	dial     func(ctx context.Context, network, address string) (net.Conn, error)
	log      *slog.Logger
	now      func() time.Time
	// tlsSessions lets a new connection to an MX host resume an earlier
	// TLS session (RFC 8446 §2.2, RFC 5077); nil when turned off. Each
	// Engine has its own.
	tlsSessions tls.ClientSessionCache

	mu     sync.Mutex
	idle   map[connKey][]*session
	dests  map[string]*destState // by shaping key
	closed bool
}

var _ queue.Deliverer = (*Engine)(nil)

// New checks opts and returns an Engine.
func New(opts Options) (*Engine, error) {
	host := strings.TrimSuffix(strings.ToLower(opts.Hostname), ".")
	if host == "" {
		return nil, errors.New("delivery: hostname is required (it is the EHLO name)")
	}
	if strings.ContainsAny(host, " \r\n\t") {
		return nil, fmt.Errorf("delivery: hostname %q is not a host name", opts.Hostname)
	}
	if opts.Resolver == nil {
		return nil, errors.New("delivery: a resolver is required")
	}
	switch opts.IPVersion {
	case resolve.IPBoth, resolve.IPv4, resolve.IPv6:
	default:
		return nil, fmt.Errorf("delivery: ip_version must be both, 4 or 6, not %d", opts.IPVersion)
	}
	t, err := compileTables(opts.Overrides, opts.Routes, opts.Limits)
	if err != nil {
		return nil, err
	}
	if opts.ConnectTimeout <= 0 {
		opts.ConnectTimeout = DefaultConnectTimeout
	}
	if opts.IdleTimeout == 0 {
		opts.IdleTimeout = 10 * time.Second
	}
	if opts.MaxConnsPerDomain <= 0 {
		opts.MaxConnsPerDomain = DefaultMaxConnsPerDomain
	}
	if opts.ThrottleFor <= 0 {
		opts.ThrottleFor = 5 * time.Minute
	}
	opts.Timeouts = opts.Timeouts.withDefaults()
	e := &Engine{
		opts:     opts,
		hostname: host,
		dial:     opts.DialContext,
		log:      opts.Logger,
		now:      opts.Now,
		idle:     make(map[connKey][]*session),
		dests:    make(map[string]*destState),
	}
	e.tables.Store(t)
	if n := opts.TLSSessionCacheSize; n >= 0 {
		if n == 0 {
			n = DefaultTLSSessionCacheSize
		}
		e.tlsSessions = tls.NewLRUClientSessionCache(n)
	}
	if e.dial == nil {
		d := &net.Dialer{}
		e.dial = d.DialContext
	}
	if e.log == nil {
		e.log = slog.Default()
	}
	if e.now == nil {
		e.now = time.Now
	}
	return e, nil
}

// canonicalDomain lower-cases d and drops a trailing dot.
func canonicalDomain(d string) string {
	return strings.TrimSuffix(strings.ToLower(strings.TrimSpace(d)), ".")
}
