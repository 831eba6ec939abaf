// Package delivery sends queued messages to the MX hosts of their
// recipients' domains: it routes (RFC 5321 §5.1, RFC 7505), asks a
// policy.PolicySource which TLS each MX host needs (MTA-STS RFC 8461, DANE
// RFC 7672, local overrides), runs the SMTP client session and turns every
// reply into a per-recipient queue.Status (docs/DESIGN.md, "What deferrals
// say").
package delivery

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
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
	// Recorder receives one policy.SessionResult per TLS session attempt; nil
	// records nothing.
	Recorder policy.Recorder

	// Port is the SMTP port dialed on every MX host; 0 means 25. Only
	// tests set it.
	Port int
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
	// MaxConnsPerDomain bounds simultaneous connections to one domain;
	// 0 means DefaultMaxConnsPerDomain. Deliver waits for a free slot, or
	// for ctx.
	MaxConnsPerDomain int

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
	opts      Options
	hostname  string // canonical, no trailing dot
	overrides map[string]override
	dial      func(ctx context.Context, network, address string) (net.Conn, error)
	log       *slog.Logger
	now       func() time.Time

	mu     sync.Mutex
	idle   map[connKey][]*session
	slots  map[string]int // open connections per domain
	wake   chan struct{}  // closed and replaced when a slot frees
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
	overrides := make(map[string]override, len(opts.Overrides))
	for _, o := range opts.Overrides {
		d := canonicalDomain(o.Domain)
		if d == "" {
			return nil, errors.New("delivery: a policy override has an empty domain")
		}
		if _, dup := overrides[d]; dup {
			return nil, fmt.Errorf("delivery: two policy overrides for domain %q", d)
		}
		if o.TLS < policy.SecurityMay || o.TLS > policy.SecurityDANE {
			return nil, fmt.Errorf("delivery: policy override for %q: unknown tls level %d", d, o.TLS)
		}
		overrides[d] = override{sec: o.TLS, id: policy.NewIdentity(policy.TypeLocal, d, []string{"tls: " + o.TLS.String()}, nil)}
	}
	if opts.Port == 0 {
		opts.Port = 25
	}
	if opts.Port < 0 || opts.Port > 65535 {
		return nil, fmt.Errorf("delivery: port %d is not a TCP port", opts.Port)
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
	opts.Timeouts = opts.Timeouts.withDefaults()
	e := &Engine{
		opts:      opts,
		hostname:  host,
		overrides: overrides,
		dial:      opts.DialContext,
		log:       opts.Logger,
		now:       opts.Now,
		idle:      make(map[connKey][]*session),
		slots:     make(map[string]int),
		wake:      make(chan struct{}),
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
