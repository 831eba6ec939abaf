package delivery

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/textproto"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
)

const (
	// maxReplyBytes bounds what one server reply (or TLS handshake) may
	// send us; an EHLO reply is well under 1 KiB.
	maxReplyBytes = 64 << 10
	// maxHandshakeBytes bounds the TLS handshake, certificate chain
	// included.
	maxHandshakeBytes = 256 << 10
	// maxTextLen bounds how much of a remote reply goes into a Status.
	maxTextLen = 400
)

// failKind says why a host could not take the message, which decides the
// status when no host could (docs/DESIGN.md, "What deferrals say").
type failKind int

const (
	failRoute      failKind = iota // DNS for this MX host
	failTransport                  // connect, greeting, protocol, lost connection
	failSTS                        // the MTA-STS requirement was not met
	failDANE                       // the DANE requirement was not met
	failLocal                      // a local override's requirement was not met
	failRequireTLS                 // RFC 8689 conditions not met for this host
	failUTF8                       // the message needs SMTPUTF8, the host lacks it
	failAuth                       // a route's credentials could not be used or were refused
	failEightBit                   // the message has 8-bit content, the host lacks 8BITMIME
	failSize                       // the message is larger than the host's SIZE limit
)

// hostFailure is why one MX host (or one of its addresses) was not used.
type hostFailure struct {
	host     string // "mx.example.com" or "mx.example.com[192.0.2.1]"
	kind     failKind
	notFound bool   // the MX host name has no addresses
	reason   string // short, for the combined policy deferral
	status   queue.Status
	// nextHost says the other addresses of this host are not worth
	// trying (the host itself answered).
	nextHost bool
	// spokenFor says another address of the same host then refused the
	// session itself: this address's silence is no answer for the host
	// (aggregate), whichever address DNS listed first.
	spokenFor bool
	// throttle says the host answered "too many connections".
	throttle bool
	// stale says a connection taken from the idle cache turned out
	// closed or unwilling at its first RSET: nothing of the message went
	// out, and the host is tried again on another connection.
	stale bool
	// stop says no other host is to be tried in this attempt: the upstream
	// refused the route's password, which the next host would get too.
	stop bool
	// peerCerts is the chain a host sent before it failed its
	// requirement, for check.
	peerCerts []*x509.Certificate
}

// session is one SMTP connection that has said EHLO (and AUTH, when its
// route has credentials) and is ready for MAIL.
type session struct {
	e            *Engine
	key          connKey
	dest         string // NextHop.dest: who may reuse it
	metricName   string // NextHop.metricName
	policyDomain string // where its TLS results are reported; "" for none
	shapeKey     string // the traffic limits it counts toward
	shaping      Shaping
	mx           policy.MX
	addr         netip.Addr
	label        string // "mx.example.com[192.0.2.1]", ":port" added when not 25; for every text and log line
	req          policy.Requirement
	fresh        bool // no TLS session resumption (hop.fresh)

	conn   *boundedConn
	client *smtp.Client
	replay *replayConn // what client reads from
	// rd and bw read replies and write the body on the pipelined path
	// (RFC 2920), which goes around client.
	rd   *replyReader
	bw   *bufio.Writer
	helo string               // host name from the greeting (TLSRPT receiving-mx-helo)
	tls  *tls.ConnectionState // nil in plaintext
	tlsc *tls.Conn
	// pkixMX caches authenticatedMX.
	pkixMX *bool
	// tlsProblem is a verification failure tolerated because the policy
	// is in testing mode.
	tlsProblem string
	// certName is the name of req.Names the certificate matched at the
	// handshake under SecurityVerify, for the log line of every message
	// the connection carries.
	certName string
	// limits are the remote's LIMITS (RFC 9422), from the EHLO that counts.
	limits limits
	// broken says the connection must not be used again.
	broken bool
	// refusesRecipients says the remote refused a transaction's first
	// recipient at its recipient limit: the session takes no more, and
	// is not kept for the next message.
	refusesRecipients bool
	// messages counts the transactions started (MAIL commands sent),
	// for transactionLimit.
	messages int
	// throttled says the remote answered "too many connections".
	throttled string

	idleTimer *time.Timer
	opened    time.Time
	reused    bool // taken from the idle cache
	// probe says the session came from the idle cache and has not yet
	// shown it is alive: its next command group starts with RSET.
	probe bool
}

// transactionLimit is how many mail transactions s may carry, 0 for no
// limit: the smaller of the remote's MAILMAX (RFC 9422 §4.1) and the
// destination's max_messages_per_connection; mailMax says it is the
// remote's.
func (s *session) transactionLimit() (n int, mailMax bool) {
	n = s.shaping.MaxMessagesPerConn
	if m := s.limits.mailMax; m > 0 && (n <= 0 || m <= n) {
		return m, true
	}
	return n, false
}

// connKey identifies connections that may carry each other's messages:
// same destination (recipient domain, or route target and account) and MX
// host, opened under the same requirement, and with the same outcome of
// STARTTLS, so a plaintext connection left by a failed handshake never
// serves a message that needs TLS.
type connKey struct {
	dest string
	mx   string
	req  string
	tls  bool
}

func keyFor(nh NextHop, mx policy.MX, req policy.Requirement, tls bool) connKey {
	return connKey{dest: nh.dest(), mx: mx.Name, req: req.Key(), tls: tls}
}

// boundedConn limits how many bytes may be read before the next allow,
// so no reply (or handshake) can be made to grow without bound.
type boundedConn struct {
	net.Conn
	budget int
}

var errReplyTooLong = errors.New("reply too long")

func (c *boundedConn) allow(n int) { c.budget = n }

func (c *boundedConn) Read(p []byte) (int, error) {
	if c.budget <= 0 {
		return 0, errReplyTooLong
	}
	if len(p) > c.budget {
		p = p[:c.budget]
	}
	n, err := c.Conn.Read(p)
	c.budget -= n
	return n, err
}

// replayConn hands go-smtp's Client the greeting we already read: it
// insists on reading one itself, and on STARTTLS with its own EHLO name.
type replayConn struct {
	net.Conn
	pending []byte
	// skipEHLO drops go-smtp's EHLO, whose reply pending already holds:
	// the one we sent on this plaintext connection before STARTTLS was
	// found missing or refused. The server's state is that of our EHLO
	// (RFC 3207 §4: only a completed handshake resets it).
	skipEHLO bool
}

func (c *replayConn) Write(p []byte) (int, error) {
	if c.skipEHLO {
		c.skipEHLO = false
		if bytes.HasPrefix(p, []byte("EHLO ")) && bytes.HasSuffix(p, []byte("\r\n")) && bytes.Count(p, []byte("\n")) == 1 {
			return len(p), nil
		}
	}
	return c.Conn.Write(p)
}

func (c *replayConn) Read(p []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// dialResult is the outcome of one connection attempt to one address.
type dialResult struct {
	s    *session
	fail *hostFailure
	// retryPlain asks for one more connection without STARTTLS, after a
	// failed handshake at security level may (as Postfix does).
	retryPlain bool
}

// hopLabel names one address of a host in every text and log line:
// "mx.example.com[192.0.2.1]", "[192.0.2.1]", with ":587" when the port
// is not 25.
func hopLabel(nh NextHop, mx policy.MX, addr netip.Addr) string {
	label := fmt.Sprintf("%s[%s]", mx.Name, addr)
	if strings.HasPrefix(mx.Name, "[") {
		label = mx.Name // an address names itself
	}
	if nh.Port != 25 {
		label += ":" + strconv.Itoa(nh.Port)
	}
	return label
}

// open connects to addr and brings the session to the point where MAIL
// can be sent, enforcing req and logging in when nh has credentials.
// requireTLS is the message's REQUIRETLS flag.
func (e *Engine) open(ctx context.Context, nh NextHop, h hop, addr netip.Addr, req policy.Requirement, requireTLS, plaintext bool) dialResult {
	mx := h.mx
	label := hopLabel(nh, mx, addr)
	s := &session{e: e, dest: nh.dest(), metricName: nh.metricName(), policyDomain: nh.PolicyDomain,
		shapeKey: h.key, shaping: h.shaping, mx: mx, addr: addr, label: label, req: req, fresh: h.fresh}

	dctx, cancel := context.WithTimeout(ctx, e.opts.ConnectTimeout)
	raw, err := e.dial(dctx, "tcp", netip.AddrPortFrom(addr, uint16(nh.Port)).String())
	cancel()
	if err != nil {
		return dialResult{fail: transportFailure(ctx, label, "connecting", err)}
	}
	connOpened(s.metricName)
	s.opened = e.now()
	s.conn = &boundedConn{Conn: raw}
	// The session belongs to ctx until it goes back to the idle cache:
	// cancelling ctx closes the connection, which unblocks every read.
	stop := context.AfterFunc(ctx, func() { raw.Close() })
	defer stop()

	fail := func(f *hostFailure) dialResult {
		s.close()
		return dialResult{fail: f}
	}
	var rd io.Reader = s.conn
	if nh.ImplicitTLS {
		// RFC 8314 §3.3: TLS from the first byte; there is no plaintext
		// to fall back to.
		r := e.startTLS(ctx, s, req, requireTLS, true)
		if r.fail != nil {
			s.close()
			return r
		}
		rd = s.tlsc
	}
	tp := textproto.NewReader(bufio.NewReader(rd))

	// Greeting (RFC 5321 §4.5.3.2.1: 5 minutes).
	s.conn.allow(maxReplyBytes)
	s.conn.SetDeadline(time.Now().Add(e.opts.Timeouts.Greeting))
	code, msg, err := readReply(tp, 0)
	if err != nil {
		return fail(transportFailure(ctx, label, "waiting for the greeting", err))
	}
	if code != 220 {
		// RFC 5321 §3.1: a 554 (or 4xx) greeting means no service here;
		// try the next MX host.
		f := replyFailure(label, code, msg)
		f.nextHost = true
		f.throttle = tooManyConnections(code, msg, true)
		return fail(f)
	}
	greeting := firstLine(msg)
	s.helo, _, _ = strings.Cut(greeting, " ")

	wantTLS := req.WantTLS() && !plaintext && s.tls == nil
	mustTLS := req.MustTLS() || requireTLS
	var ext map[string]string
	var ehloReply string // the reply to our EHLO, as received
	noSTARTTLS := "STARTTLS not offered"
	if wantTLS {
		code, msg, err := s.ehlo(tp)
		switch {
		case err != nil:
			return fail(transportFailure(ctx, label, "EHLO", err))
		case code == 250:
			ext = ehloKeywords(msg)
		case code == 500 || code == 502:
			// RFC 5321 §3.2: a server that does not know EHLO gets HELO
			// (go-smtp's, on this reply replayed), and HELO has no STARTTLS.
			noSTARTTLS += " (EHLO not supported: " + replyText(code, msg) + ")"
		default:
			// A refusal of the session, as a refused greeting is: the
			// host never said whether it offers STARTTLS, so nothing
			// goes into a TLS report.
			f := replyFailure(label, code, msg)
			f.nextHost = true
			f.throttle = tooManyConnections(code, msg, true)
			return fail(f)
		}
		ehloReply = replyLines(code, msg)
	}
	if _, ok := ext["STARTTLS"]; wantTLS && !ok {
		s.record(req, policy.ResultSTARTTLSNotSupported, noSTARTTLS)
		if mustTLS {
			return fail(e.policyFailure(label, mx, req, requireTLS, noSTARTTLS))
		}
		wantTLS = false
	}
	if wantTLS {
		s.conn.allow(maxReplyBytes)
		s.conn.SetDeadline(time.Now().Add(e.opts.Timeouts.Command))
		if err := writeLine(s.conn, "STARTTLS"); err != nil {
			return fail(transportFailure(ctx, label, "STARTTLS", err))
		}
		code, msg, err := readReply(tp, 0)
		if err != nil {
			return fail(transportFailure(ctx, label, "STARTTLS", err))
		}
		if code != 220 {
			reason := "STARTTLS refused: " + replyText(code, msg)
			s.record(req, policy.ResultSTARTTLSNotSupported, reason)
			if mustTLS {
				return fail(e.policyFailure(label, mx, req, requireTLS, reason))
			}
			wantTLS = false
		} else if tp.R.Buffered() > 0 {
			// Anything sent after the 220 would be injected into the TLS
			// session's plaintext (CVE-2011-0411); refuse to go on.
			return fail(&hostFailure{host: label, kind: failTransport, status: queue.Status{Code: 451, Enhanced: "4.4.2",
				Text: label + ": data after the STARTTLS reply, before the TLS handshake"}})
		} else {
			r := e.startTLS(ctx, s, req, requireTLS, false)
			if r.fail != nil || r.retryPlain {
				s.close()
				return r
			}
		}
	}

	// Hand the connection to go-smtp with the greeting it expects. After
	// TLS it says EHLO itself (RFC 3207 §4.2); in plaintext its EHLO gets
	// the reply to ours (skipEHLO), and goes out only when ours was not
	// sent.
	var conn net.Conn = s.conn
	if tc, ok := s.tlsConn(); ok {
		conn = tc
	}
	pending := []byte("220 " + greeting + "\r\n")
	skipEHLO := s.tls == nil && ehloReply != ""
	if skipEHLO {
		pending = append(pending, ehloReply...)
	}
	if s.tls == nil || nh.ImplicitTLS {
		// What tp read ahead belongs to the stream go-smtp goes on with
		// (after STARTTLS it was plaintext, and there is none: see above).
		if n := tp.R.Buffered(); n > 0 {
			rest, _ := tp.R.Peek(n)
			pending = append(pending, rest...)
		}
	}
	s.replay = &replayConn{Conn: conn, pending: pending, skipEHLO: skipEHLO}
	s.client = smtp.NewClient(s.replay)
	s.client.CommandTimeout = e.opts.Timeouts.Command
	s.conn.allow(maxReplyBytes)
	if err := s.client.Hello(s.e.hostname); err != nil {
		// Refused as the EHLO before STARTTLS is (go-smtp tried HELO
		// after 500 or 502).
		f := s.commandFailure(ctx, "EHLO", err, true)
		f.throttle = tooManyConnections(f.status.Code, f.status.Text, true)
		return fail(f)
	}
	if nh.auth != nil {
		if f := s.login(ctx, nh); f != nil {
			s.quitQuietly()
			return dialResult{fail: f}
		}
	}
	if ok, params := s.client.Extension("LIMITS"); ok {
		s.limits = parseLimits(params)
	}
	s.key = keyFor(nh, mx, req, s.tls != nil)
	if !stop() {
		// Cut off after the last read: the connection is closed, or about
		// to be, and must not reach the idle cache as an unused session.
		return fail(transportFailure(ctx, label, "connecting", context.Cause(ctx)))
	}
	return dialResult{s: s}
}

// login authenticates with nh's credentials (RFC 4954), only over TLS
// that met the route's level: a verification failure that MTA-STS testing
// let pass is not good enough for a password. The password never goes
// into a status, a log line or a report.
func (s *session) login(ctx context.Context, nh NextHop) *hostFailure {
	refuse := func(enhanced, why string) *hostFailure {
		return &hostFailure{host: s.label, kind: failAuth, status: queue.Status{Code: 451, Enhanced: enhanced,
			Text: fmt.Sprintf("%s: %s; credentials of %s not sent", s.label, why, nh.Route)}}
	}
	switch {
	case s.tls == nil:
		return refuse("4.7.10", "no TLS (STARTTLS not offered or failed)")
	case s.tlsProblem != "":
		return refuse("4.7.10", "TLS not verified ("+s.tlsProblem+")")
	case nh.local != nil && !nh.local.Published && nh.local.Security.Authenticates() && !s.req.MustAuthenticate():
		// The session was held to less than the route's level (plan's
		// effective keeps it; this is the last line of defence).
		return refuse("4.7.10", "TLS not authenticated as the route's tls = "+levelName(nh.local.Security)+" requires")
	}
	ok, mechs := s.client.Extension("AUTH")
	if !ok {
		return refuse("4.7.0", "AUTH not offered")
	}
	var client sasl.Client
	switch offered := strings.Fields(strings.ToUpper(mechs)); {
	case slices.Contains(offered, sasl.Plain):
		client = sasl.NewPlainClient("", nh.auth.Username, nh.auth.Password)
	case slices.Contains(offered, sasl.Login):
		client = sasl.NewLoginClient(nh.auth.Username, nh.auth.Password)
	default:
		return refuse("4.7.0", "AUTH offers neither PLAIN nor LOGIN ("+oneLine(mechs)+")")
	}
	s.conn.allow(maxReplyBytes)
	s.client.CommandTimeout = s.e.opts.Timeouts.Command
	err := s.client.Auth(client)
	if err == nil {
		return nil
	}
	var se *smtp.SMTPError
	if !errors.As(err, &se) {
		s.broken = true
		f := transportFailure(ctx, s.label, "AUTH", err)
		f.kind = failAuth
		return f
	}
	st := smtpErrorStatus(s.label, se)
	st.Text = scrub(st.Text, nh.auth)
	if st.Permanent() {
		// A refused password is the operator's to fix, not the
		// recipient's fault: defer, keeping the upstream's words.
		st.Code, st.Enhanced = 451, "4.7.0"
		if se.Code == 535 {
			st.Enhanced = "4.7.8"
		}
	}
	st.Text = truncate(fmt.Sprintf("%s (authentication with the credentials of %s)", st.Text, nh.Route))
	return &hostFailure{host: s.label, kind: failAuth, status: st, nextHost: true, stop: true}
}

// scrub removes the credentials from remote text, should a server echo
// them.
func scrub(text string, c *Credentials) string {
	if c.Password != "" {
		text = strings.ReplaceAll(text, c.Password, "[redacted]")
	}
	if len(c.Username) >= 4 {
		text = strings.ReplaceAll(text, c.Username, "[redacted]")
	}
	return text
}

// tooManyConnections reports whether a reply says the remote wants fewer
// connections from us: a 421 that refuses the session (to the greeting or
// EHLO: opening is set), or a 4xx that says so.
func tooManyConnections(code int, text string, opening bool) bool {
	if code < 400 || code > 499 {
		return false
	}
	if opening && code == 421 {
		return true
	}
	t := strings.ToLower(text)
	for _, p := range []string{"too many connections", "too many concurrent", "too many simultaneous", "connection limit", "too many sessions"} {
		if strings.Contains(t, p) {
			return true
		}
	}
	return false
}

// tlsConn returns the session's TLS connection, if it has one.
func (s *session) tlsConn() (*tls.Conn, bool) {
	return s.tlsc, s.tlsc != nil
}

// ehlo sends our EHLO on the plaintext connection and returns the reply.
func (s *session) ehlo(tp *textproto.Reader) (int, string, error) {
	s.conn.allow(maxReplyBytes)
	s.conn.SetDeadline(time.Now().Add(s.e.opts.Timeouts.Command))
	if err := writeLine(s.conn, "EHLO "+s.e.hostname); err != nil {
		return 0, "", err
	}
	return readReply(tp, 0)
}

// ehloKeywords are the extensions a 250 reply to EHLO offers, by keyword
// in upper case (RFC 5321 §2.4).
func ehloKeywords(msg string) map[string]string {
	ext := make(map[string]string)
	lines := strings.Split(msg, "\n")
	for _, l := range lines[1:] {
		k, v, _ := strings.Cut(l, " ")
		ext[strings.ToUpper(k)] = v
	}
	return ext
}

// replyLines writes a reply out again as it came, for go-smtp to read.
func replyLines(code int, msg string) string {
	var b strings.Builder
	lines := strings.Split(msg, "\n")
	for i, l := range lines {
		sep := "-"
		if i == len(lines)-1 {
			sep = " "
		}
		b.WriteString(strconv.Itoa(code) + sep + l + "\r\n")
	}
	return b.String()
}

// startTLS runs the handshake after a 220 to STARTTLS and checks the
// certificate as req demands.
// With implicit set the connection has no plaintext phase (port 465), so a
// failed handshake is never retried in plaintext.
func (e *Engine) startTLS(ctx context.Context, s *session, req policy.Requirement, requireTLS, implicit bool) dialResult {
	serverName := req.ServerName
	if serverName == "" {
		serverName = s.mx.Name // RFC 8461 §7.1: SNI is the MX host name
	}
	if strings.HasPrefix(serverName, "[") {
		serverName = s.addr.String() // an address: crypto/tls sends no SNI
	}
	// verdict is authenticate's answer, given inside the handshake to
	// the chain seen.
	var (
		verdict *policy.Failure
		seen    []*x509.Certificate
	)
	cfg := &tls.Config{
		ServerName: serverName,
		MinVersion: tls.VersionTLS12, // RFC 8461 §7.2
		// crypto/tls's own check is off: the requirement says what a
		// valid certificate is (Web PKI and names, or TLSA records).
		InsecureSkipVerify: true,
		// The requirement's check runs inside the handshake rather than
		// after it, so a certificate that must authenticate and does
		// not ends the handshake with a bad_certificate alert: the
		// server sees why, as from any conformant DANE or MTA-STS
		// client, and not a byte of SMTP crosses the channel. Where
		// authentication is not demanded (opportunistic TLS, MTA-STS
		// testing) the failure is only noted and the session goes on.
		VerifyConnection: func(cs tls.ConnectionState) error {
			seen = cs.PeerCertificates
			verdict = e.authenticate(s, req, cs)
			if verdict != nil && req.MustAuthenticate() {
				return verdict
			}
			return nil
		},
	}
	if !s.fresh {
		// Resumption skips the certificate exchange, not the check:
		// crypto/tls calls VerifyConnection on resumed handshakes too,
		// with the chain of the session resumed (Go 1.26
		// crypto/tls/handshake_client.go, clientHandshakeState.handshake,
		// "Make sure the connection is still being verified whether or
		// not this is a resumption"; handshake_client_tls13.go,
		// readServerCertificate, for TLS 1.3 PSKs), so the requirement of
		// this connection judges that chain as if just sent; a handshake
		// that fails drops the session (RFC 5077 §3.2), and one whose
		// certificate has expired is not offered. Sessions are kept per
		// ServerName, the MX host name: the addresses of one host share
		// them, and connections under different requirements too, which
		// is safe because each runs its own check.
		cfg.ClientSessionCache = e.tlsSessions
	}
	tc := tls.Client(s.conn, cfg)
	s.conn.allow(maxHandshakeBytes)
	s.conn.SetDeadline(time.Now().Add(e.opts.Timeouts.Command))
	if err := tc.HandshakeContext(ctx); err != nil {
		if ctx.Err() != nil {
			// Cut off by shutdown: not the server's fault, so not a
			// result for a TLS report.
			return dialResult{fail: transportFailure(ctx, s.label, "TLS handshake", err)}
		}
		if verdict != nil && req.MustAuthenticate() {
			s.record(req, verdict.Result, verdict.Reason)
			f := e.policyFailure(s.label, s.mx, req, requireTLS, verdict.Reason)
			f.peerCerts = seen
			return dialResult{fail: f}
		}
		reason := "TLS handshake failed: " + oneLine(err.Error())
		s.record(req, policy.ResultValidationFailure, reason)
		if req.MustTLS() || requireTLS {
			return dialResult{fail: e.policyFailure(s.label, s.mx, req, requireTLS, reason)}
		}
		if implicit {
			return dialResult{fail: &hostFailure{host: s.label, kind: failTransport,
				status: queue.Status{Code: 451, Enhanced: "4.4.2", Text: s.label + ": " + reason}}}
		}
		return dialResult{retryPlain: true}
	}
	cs := tc.ConnectionState()
	s.tls, s.tlsc = &cs, tc
	if cs.DidResume {
		metricTLSResumed.Inc()
	}

	if verdict != nil {
		// Not demanded (testing mode): report it, deliver anyway.
		s.record(req, verdict.Result, verdict.Reason)
		s.tlsProblem = verdict.Reason
		return dialResult{}
	}
	if req.Skip != "" {
		// Testing mode went ahead with a host the policy rules out: TLS
		// worked, the session still failed the policy (RFC 8460 §4.3).
		s.record(req, req.SkipResultType(), req.Skip)
		return dialResult{}
	}
	s.record(req, policy.ResultSuccess, "")
	return dialResult{}
}

// authenticate checks the server's certificate as req demands: the one
// place that decides what "verified" means. A nil result is a pass.
func (e *Engine) authenticate(s *session, req policy.Requirement, cs tls.ConnectionState) *policy.Failure {
	switch req.Security {
	case policy.SecurityVerify:
		names := req.Names
		if len(names) == 0 {
			names = []string{s.mx.Name}
		}
		if f := e.verifyChain(cs); f != nil {
			return f
		}
		name, f := matchName(cs, names)
		s.certName = name
		return f
	case policy.SecurityDANE:
		if req.DANE == nil {
			return &policy.Failure{Result: policy.ResultDANERequired, Reason: "DANE required but no usable TLSA records"}
		}
		return req.DANE.Authenticate(cs.PeerCertificates, e.now())
	}
	return nil
}

// authenticatedMX reports whether the session's server is authenticated
// as REQUIRETLS demands (RFC 8689 §4.2.1): by DANE, or by a PKIX-valid
// certificate for the MX host name. Only REQUIRETLS messages ask, so the
// PKIX check is made on demand.
func (s *session) authenticatedMX() bool {
	if s.tls == nil {
		return false
	}
	if s.req.Security == policy.SecurityDANE && s.req.DANE != nil && s.tlsProblem == "" {
		return true // startTLS let the session through only if TLSA matched
	}
	if s.pkixMX == nil {
		_, f := matchName(*s.tls, []string{s.mx.Name})
		ok := f == nil && s.e.verifyChain(*s.tls) == nil
		s.pkixMX = &ok
	}
	return *s.pkixMX
}

// verifyChain checks that the peer's certificate chains to RootCAs and is
// valid now (RFC 8461 §4.2).
func (e *Engine) verifyChain(cs tls.ConnectionState) *policy.Failure {
	certs := cs.PeerCertificates
	if len(certs) == 0 {
		return &policy.Failure{Result: policy.ResultCertificateNotTrusted, Reason: "certificate not trusted: no certificate"}
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	_, err := certs[0].Verify(x509.VerifyOptions{
		Roots:         e.opts.RootCAs,
		Intermediates: inter,
		CurrentTime:   e.now(),
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		var inv x509.CertificateInvalidError
		var ua x509.UnknownAuthorityError
		switch {
		case errors.As(err, &inv) && inv.Reason == x509.Expired:
			return &policy.Failure{Result: policy.ResultCertificateExpired, Reason: "certificate expired"}
		case errors.As(err, &ua):
			return &policy.Failure{Result: policy.ResultCertificateNotTrusted, Reason: "certificate not trusted"}
		}
		return &policy.Failure{Result: policy.ResultCertificateNotTrusted, Reason: "certificate not trusted: " + oneLine(err.Error())}
	}
	return nil
}

// matchName checks that the peer's certificate has a SAN dNSName matching
// one of names (RFC 8461 §4.2: no CN fallback; a wildcard is the whole
// left-most label, as x509.Certificate.VerifyHostname does), and returns
// the first name that matched.
func matchName(cs tls.ConnectionState, names []string) (string, *policy.Failure) {
	certs := cs.PeerCertificates
	if len(certs) == 0 {
		return "", &policy.Failure{Result: policy.ResultCertificateNotTrusted, Reason: "certificate not trusted: no certificate"}
	}
	for _, n := range names {
		if certs[0].VerifyHostname(strings.TrimSuffix(n, ".")) == nil {
			return n, nil
		}
	}
	return "", &policy.Failure{Result: policy.ResultCertificateHostMismatch, Reason: "certificate name mismatch"}
}

// record gives one TLS session attempt to the Recorder (RFC 8460 §4.3).
func (s *session) record(req policy.Requirement, result policy.ResultType, detail string) {
	local := ""
	if a, ok := s.conn.LocalAddr().(*net.TCPAddr); ok {
		local = a.IP.String()
	}
	s.e.record(req, policy.SessionResult{
		PolicyDomain: s.policyDomain,
		Policy:       req.Policy,
		MX:           s.mx.Name,
		SendingIP:    local,
		ReceivingIP:  s.addr.String(),
		HELO:         s.helo,
		Result:       result,
		Detail:       detail,
		Unreported:   req.Unreported,
	})
}

// policyFailure is a host that did not meet its TLS requirement.
func (e *Engine) policyFailure(label string, mx policy.MX, req policy.Requirement, requireTLS bool, reason string) *hostFailure {
	f := &hostFailure{host: mx.Name, reason: reason, nextHost: false}
	switch {
	case req.Source() == policy.TypeSTS && req.MustTLS():
		f.kind = failSTS
		f.status = queue.Status{Code: 451, Enhanced: "4.4.8", Text: fmt.Sprintf("%s: %s (MTA-STS)", label, reason)}
	case req.Source() == policy.TypeTLSA && !req.Testing:
		f.kind = failDANE
		f.status = queue.Status{Code: 451, Enhanced: "4.7.5", Text: fmt.Sprintf("%s: %s (DANE)", label, reason)}
	case requireTLS && !req.MustTLS():
		return requireTLSFailure(label, reason)
	default:
		f.kind = failLocal
		f.status = queue.Status{Code: 451, Enhanced: "4.7.5", Text: fmt.Sprintf("%s: %s (TLS required by local policy)", label, reason)}
	}
	return f
}

func requireTLSFailure(label, reason string) *hostFailure {
	return &hostFailure{host: label, kind: failRequireTLS, reason: reason, nextHost: true,
		status: queue.Status{Code: 550, Enhanced: "5.7.30", Text: fmt.Sprintf("%s: %s (message requires TLS, RFC 8689)", label, reason)}}
}

// isTimeout says err is a deadline that passed.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout()
}

// transportFailure describes a connection that failed during step.
func transportFailure(ctx context.Context, label, step string, err error) *hostFailure {
	f := &hostFailure{host: label, kind: failTransport}
	st := queue.Status{Code: 451, Enhanced: "4.4.2"}
	var pe textproto.ProtocolError
	switch {
	case ctx.Err() != nil:
		st.Text = fmt.Sprintf("%s: delivery interrupted %s (%v)", label, step, context.Cause(ctx))
	case errors.Is(err, syscall.ECONNREFUSED):
		st.Enhanced, st.Text = "4.4.1", label+": connection refused"
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		st.Enhanced, st.Text = "4.4.1", label+": host unreachable"
	case isTimeout(err):
		if step == "connecting" {
			st.Enhanced, st.Text = "4.4.1", label+": connection timed out"
		} else {
			st.Text = fmt.Sprintf("%s: timeout %s", label, step)
		}
	case errors.Is(err, errReplyTooLong), errors.Is(err, smtp.ErrTooLongLine):
		st.Text = fmt.Sprintf("%s: reply too long %s; not an SMTP server?", label, step)
	case errors.As(err, &pe):
		st.Text = fmt.Sprintf("%s: malformed reply %s (%s); not an SMTP server?", label, step, oneLine(string(pe)))
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNRESET), errors.Is(err, net.ErrClosed), errors.Is(err, syscall.EPIPE):
		st.Text = fmt.Sprintf("%s: connection lost %s", label, step)
	default:
		st.Text = fmt.Sprintf("%s: %s: %s", label, step, oneLine(err.Error()))
	}
	f.status = st
	return f
}

// replyFailure is a host that answered with an error reply.
func replyFailure(label string, code int, msg string) *hostFailure {
	return &hostFailure{host: label, kind: failTransport, status: failureStatus(label, code, msg)}
}

// failureStatus is replyStatus for a reply that ends a step: a code that
// is not 4xx or 5xx there is a protocol violation, never a success.
func failureStatus(label string, code int, msg string) queue.Status {
	if code < 400 || code > 599 {
		return queue.Status{Code: 451, Enhanced: "4.5.0", RemoteMTA: hostOf(label), Reply: replyText(code, msg),
			Text: truncate(fmt.Sprintf("%s: unexpected reply %d %s", label, code, oneLine(msg)))}
	}
	return replyStatus(label, code, msg)
}

// replyStatus turns a remote reply into a Status, keeping the remote's
// words: "mx.example.com[192.0.2.1]: 451 4.7.1 greylisted, try later",
// and the reply as received for a DSN's Diagnostic-Code.
// A reply without an enhanced code gets the generic class code (RFC 3463 §3.1).
//
// It runs for every delivered message, so it is built without fmt.
func replyStatus(label string, code int, msg string) queue.Status {
	line := oneLine(msg)
	enh, text := splitEnhanced(code, line)
	if enh == "" {
		enh = classCode(code)
	}
	var buf [20]byte
	c := string(strconv.AppendInt(buf[:0], int64(code), 10))
	reply, full := c, label+": "+c+" "+enh
	if line != "" {
		// RFC 5321 §4.2: the text is optional.
		reply += " " + line
	}
	if text != "" {
		full += " " + text
	}
	return queue.Status{Code: code, Enhanced: enh, RemoteMTA: hostOf(label), Reply: truncate(reply), Text: truncate(full)}
}

// classCode is the enhanced code of a reply that has none: its class
// alone (RFC 3463 §3.1).
func classCode(code int) string {
	switch code / 100 {
	case 2:
		return "2.0.0"
	case 4:
		return "4.0.0"
	case 5:
		return "5.0.0"
	}
	return strconv.Itoa(code/100) + ".0.0"
}

// splitEnhanced separates an RFC 2034 enhanced code from a reply's text,
// line, which oneLine has made one line.
func splitEnhanced(code int, line string) (string, string) {
	first, rest, _ := strings.Cut(line, " ")
	class, subject, ok1 := strings.Cut(first, ".")
	subject, detail, ok2 := strings.Cut(subject, ".")
	if !ok1 || !ok2 || strings.Contains(detail, ".") || class != strconv.Itoa(code/100) {
		return "", line
	}
	for _, p := range [2]string{subject, detail} {
		if n, err := strconv.Atoi(p); err != nil || n < 0 || n > 999 {
			return "", line
		}
	}
	// RFC 2034 repeats the code on every line; drop the repeats.
	if strings.Contains(rest, first) {
		rest = strings.ReplaceAll(rest, " "+first+" ", " ")
	}
	return first, rest
}

func replyText(code int, msg string) string {
	return truncate(strconv.Itoa(code) + " " + oneLine(msg))
}

// commandFailure classifies an error from a go-smtp Client call. A reply
// is kept as the remote said it; anything else is a lost connection.
func (s *session) commandFailure(ctx context.Context, step string, err error, nextHost bool) *hostFailure {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		f := &hostFailure{host: s.label, kind: failTransport, nextHost: nextHost}
		f.status = smtpErrorStatus(s.label, se)
		return f
	}
	s.broken = true
	return transportFailure(ctx, s.label, step, err)
}

func smtpErrorStatus(label string, se *smtp.SMTPError) queue.Status {
	msg := se.Message
	if hasEnhanced(se) {
		msg = fmt.Sprintf("%d.%d.%d %s", se.EnhancedCode[0], se.EnhancedCode[1], se.EnhancedCode[2], msg)
	}
	return failureStatus(label, se.Code, msg)
}

func hostOf(label string) string {
	h, _, _ := strings.Cut(label, "[")
	return h
}

func firstLine(msg string) string {
	l, _, _ := strings.Cut(msg, "\n")
	return oneLine(l)
}

// oneLine makes remote text safe for one log line: line breaks become
// spaces, other control characters go, and the length is bounded.
func oneLine(s string) string {
	if isOneLine(s) {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		switch {
		case r == '\n' || r == '\r' || r == '\t':
			b.WriteByte(' ')
		case unicode.IsControl(r) || unicode.Is(unicode.Bidi_Control, r) || r == utf8.RuneError:
			// C0, DEL and C1 (a CSI is 0x9b) would reach a terminal
			// through the log and the queue commands; bidi controls
			// would reorder what the operator reads.
		default:
			b.WriteRune(r)
		}
		if b.Len() > 2*maxTextLen {
			break
		}
	}
	return truncate(strings.Join(strings.Fields(b.String()), " "))
}

// isOneLine reports whether oneLine would return s unchanged: short
// printable ASCII, single spaces between words, none at the ends. Most
// replies are, and then need no copy.
func isOneLine(s string) bool {
	if len(s) > maxTextLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == ' ':
			if i == 0 || i == len(s)-1 || s[i-1] == ' ' {
				return false
			}
		case c < 0x21 || c > 0x7e:
			return false
		}
	}
	return true
}

// ellipsis marks a text cut short. ASCII: a status text goes into
// DSNs, where one non-ASCII character of ours would make an ASCII report
// a UTF-8 one (RFC 6533 types, 8-bit content the sender's MX may refuse).
const ellipsis = "..."

func truncate(s string) string {
	if len(s) <= maxTextLen {
		return s
	}
	return strings.ToValidUTF8(s[:maxTextLen], "") + ellipsis
}

func writeLine(c net.Conn, line string) error {
	_, err := io.WriteString(c, line+"\r\n")
	return err
}

// quitQuietly ends a session we will not use: QUIT with a short deadline,
// then close.
func (s *session) quitQuietly() {
	if s.conn == nil {
		return
	}
	if !s.broken {
		// A remote that never answers QUIT holds this worker and a
		// connection slot no longer than this.
		wait := min(s.e.opts.Timeouts.Command, 5*time.Second)
		s.conn.SetDeadline(time.Now().Add(wait))
		s.conn.allow(maxReplyBytes)
		if s.client != nil {
			// go-smtp sets each command's deadline from CommandTimeout,
			// the last step's (up to 5 minutes), over the one above.
			s.client.CommandTimeout = wait
			s.client.Quit()
		} else if s.tlsc != nil {
			writeLine(s.tlsc, "QUIT")
		} else {
			writeLine(s.conn, "QUIT")
		}
	}
	s.close()
}

// close drops the connection without a word.
func (s *session) close() {
	if s.conn == nil {
		return
	}
	if s.tlsc != nil {
		s.tlsc.Close()
	} else {
		s.conn.Close()
	}
	s.conn = nil
	connClosed(s.metricName)
	metricSessionDuration.Observe(s.e.now().Sub(s.opened).Seconds())
}
