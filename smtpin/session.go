package smtpin

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/queue"
)

type backend struct{ s *Server }

// NewSession is called by go-smtp at HELO/EHLO, and again after STARTTLS.
func (b backend) NewSession(sc *smtp.Conn) (smtp.Session, error) {
	s := b.s
	c := connOf(sc.Conn())
	if c == nil {
		return nil, errors.New("internal error: unknown connection type")
	}
	if c.cut.Load() {
		return nil, errClosing
	}
	sess := &session{
		srv:       s,
		sc:        sc,
		conn:      c,
		client:    c.ip,
		clientStr: c.ip.String(),
		trusted:   s.isTrusted(c.ip),
	}
	if st, ok := sc.TLSConnectionState(); ok {
		sess.tls = &st
	}
	sess.log = s.log.With("client", sess.clientStr, "conn", c.id)
	return sess, nil
}

func (s *Server) isTrusted(ip netip.Addr) bool {
	for _, p := range s.opts.TrustedNetworks {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// session is one client from EHLO (or STARTTLS) to QUIT. go-smtp calls
// Data for BDAT in another goroutine while it keeps reading commands, so
// the transaction state is guarded by mu.
type session struct {
	srv       *Server
	sc        *smtp.Conn
	conn      *conn
	client    netip.Addr
	clientStr string // client.String(), made once per session
	trusted   bool
	tls       *tls.ConnectionState // nil on a plaintext connection
	log       *slog.Logger

	mu   sync.Mutex
	user *User // nil until AUTH succeeds
	tx   *transaction
}

// transaction is one MAIL … DATA.
type transaction struct {
	env      queue.Envelope
	helo     string // as of MAIL: a client may say EHLO again
	extended bool   // the greeting was EHLO
}

var _ smtp.AuthSession = (*session)(nil)

// errClosing answers commands that go-smtp had buffered when the
// connection began to be cut off; nobody hears it, and nothing runs.
var errClosing = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 7, 0}, Message: "Closing connection"}

func (s *session) Reset() {
	s.mu.Lock()
	s.tx = nil
	s.mu.Unlock()
}

func (s *session) Logout() error { return nil }

func (s *session) AuthMechanisms() []string {
	if !s.authAllowed() || len(s.srv.users.Load().users) == 0 {
		return nil // do not offer what would be refused
	}
	return []string{sasl.Plain, sasl.Login}
}

// authAllowed: AUTH needs TLS, except from trusted networks and, when
// configured, loopback, where the password does not cross a network.
func (s *session) authAllowed() bool {
	return s.tls != nil || s.trusted || (s.srv.opts.InsecureAuthFromLoopback && s.client.IsLoopback())
}

func (s *session) Auth(mech string) (sasl.Server, error) {
	if s.conn.cut.Load() {
		return nil, errClosing
	}
	if !s.authAllowed() {
		metricAuth.WithLabelValues("refused_plaintext").Inc()
		// Refused before the client sends a name, so that no password
		// crosses the network in the clear: there is no user to name.
		s.log.Info("smtpin: auth refused: TLS required first", "mechanism", mech)
		// RFC 4954 §6 and RFC 5248: 538 5.7.11 encryption required.
		return nil, s.refused(&smtp.SMTPError{Code: 538, EnhancedCode: smtp.EnhancedCode{5, 7, 11},
			Message: "Encryption required for requested authentication mechanism: use STARTTLS first"})
	}
	if len(s.srv.users.Load().users) == 0 {
		return nil, smtp.ErrAuthUnsupported
	}
	check := func(identity, name, password string) error {
		// Limits are checked once the name is known, so that one
		// application's wrong password locks out only its own name; the
		// password of a refused attempt is not checked at all.
		switch s.srv.authLim.blocked(clientKey(s.client), name) {
		case "client":
			metricAuth.WithLabelValues("rate_limited").Inc()
			s.log.Warn("smtpin: auth refused: too many failed attempts from this client", "user", s.logUser(name))
			return s.refused(&smtp.SMTPError{Code: 454, EnhancedCode: smtp.EnhancedCode{4, 7, 0},
				Message: "Too many failed authentication attempts from your address, try again later"})
		case "user":
			metricAuth.WithLabelValues("rate_limited").Inc()
			s.log.Warn("smtpin: auth refused: too many failed attempts for this user from this client", "user", s.logUser(name))
			return s.refused(&smtp.SMTPError{Code: 454, EnhancedCode: smtp.EnhancedCode{4, 7, 0},
				Message: "Too many failed authentication attempts for this user, try again later"})
		}
		// No proxy authorization: a user acts only as itself.
		if identity != "" && identity != name {
			return s.authFailed(name, "authorization identity differs from user name")
		}
		u, ok := s.srv.users.Load().authenticate(name, password)
		if !ok {
			return s.authFailed(name, "wrong user name or password")
		}
		s.mu.Lock()
		s.user = u
		s.mu.Unlock()
		metricAuth.WithLabelValues("success").Inc()
		s.log.Info("smtpin: auth ok", "user", name, "mechanism", mech, "tls", s.tls != nil)
		return nil
	}
	var srv sasl.Server
	switch strings.ToUpper(mech) {
	case sasl.Plain:
		srv = sasl.NewPlainServer(check)
	case sasl.Login:
		srv = &loginServer{check: func(name, password string) error { return check("", name, password) }}
	default:
		return nil, smtp.ErrAuthUnknownMechanism
	}
	return saslErrors{srv, s}, nil
}

// authFailed counts, logs and delays a failed attempt, and returns the
// answer for the client.
func (s *session) authFailed(name, why string) error {
	metricAuth.WithLabelValues("failure").Inc()
	s.srv.authLim.failed(clientKey(s.client), name)
	s.log.Warn("smtpin: auth failed", "user", s.logUser(name), "reason", why)
	time.Sleep(s.srv.authFailDelay)
	return s.refused(&smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8},
		Message: "Authentication failed: " + why})
}

// logUser names the user a client tried, for a log line. A configured
// name is logged as it is; any other name only as a short hash, since
// what a client sends as its user name is sometimes the password, pasted
// into the wrong field. The hash still lets an operator tell one repeated
// name from many.
func (s *session) logUser(name string) string {
	if _, ok := s.srv.users.Load().users[name]; ok {
		return name
	}
	if name == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(name))
	return "unknown#" + hex.EncodeToString(sum[:4])
}

// saslErrors turns go-sasl's parse errors into a failed attempt; go-smtp
// would answer them with "454", inviting a retry.
type saslErrors struct {
	sasl.Server
	s *session
}

func (e saslErrors) Next(response []byte) ([]byte, bool, error) {
	challenge, done, err := e.Server.Next(response)
	if err != nil {
		if _, ok := err.(*smtp.SMTPError); !ok {
			err = e.s.authFailed("", "malformed AUTH response")
		}
	}
	return challenge, done, err
}

func (s *session) Mail(from string, opts *smtp.MailOptions) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tx = nil
	if s.conn.cut.Load() {
		return errClosing
	}

	if s.user == nil && !s.trusted {
		return s.reject("auth_required", 530, smtp.EnhancedCode{5, 7, 0},
			"Authentication required: log in with AUTH, or submit from a trusted network")
	}
	if from != "" {
		addr, err := parseMailbox(from, opts.UTF8)
		if err == errNeedsSMTPUTF8 {
			// RFC 6531 §3.5.
			return s.reject("bad_sender", 553, smtp.EnhancedCode{5, 6, 7},
				fmt.Sprintf("Sender <%s>: %v", printable(from), err))
		}
		if err != nil {
			// RFC 3463: X.1.7 bad sender's mailbox address syntax.
			return s.reject("bad_sender", 501, smtp.EnhancedCode{5, 1, 7},
				fmt.Sprintf("Bad sender address <%s>: %v", printable(from), err))
		}
		from = addr
	}
	if s.user != nil && !s.user.mayUseSender(from) {
		return s.reject("sender_not_allowed", 553, smtp.EnhancedCode{5, 7, 1},
			fmt.Sprintf("Sender <%s> is not allowed for user %s", from, s.user.Name))
	}
	if opts.Size > s.srv.opts.MaxMessageSize {
		// RFC 1870 §6.3.
		return s.reject("size", 552, smtp.EnhancedCode{5, 3, 4},
			fmt.Sprintf("Message size exceeds fixed maximum message size of %d bytes", s.srv.opts.MaxMessageSize))
	}
	// RFC 8689: REQUIRETLS is offered only under TLS; go-smtp accepts the
	// parameter in the clear too, and a message that demands TLS onward
	// must not have travelled in the clear to us.
	if opts.RequireTLS && s.tls == nil {
		return s.reject("requiretls_plaintext", 530, smtp.EnhancedCode{5, 7, 10},
			"REQUIRETLS needs a TLS session: use STARTTLS first")
	}

	env := queue.Envelope{
		From:       from,
		ClientAddr: s.clientStr,
		Body8Bit:   opts.Body == smtp.Body8BitMIME,
		SMTPUTF8:   opts.UTF8,
		RequireTLS: opts.RequireTLS,
		Ret:        string(opts.Return),
		EnvID:      opts.EnvelopeID,
	}
	if s.user != nil {
		env.User = s.user.Name
	}
	s.tx = &transaction{env: env, helo: s.sc.Hostname(), extended: s.sc.Extended()}
	return nil
}

func (s *session) Rcpt(to string, opts *smtp.RcptOptions) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn.cut.Load() {
		return errClosing
	}
	if s.tx == nil {
		return &smtp.SMTPError{Code: 503, EnhancedCode: smtp.EnhancedCode{5, 5, 1}, Message: "MAIL first"}
	}
	if s.user == nil && !s.trusted {
		return s.reject("auth_required", 530, smtp.EnhancedCode{5, 7, 0}, "Authentication required")
	}
	if strings.EqualFold(to, "postmaster") {
		// go-smtp hands on "<Postmaster>" without a domain as written.
		to = s.srv.opts.Postmaster
	}
	addr, err := parseMailbox(to, s.tx.env.SMTPUTF8)
	if err == errNeedsSMTPUTF8 {
		return s.reject("bad_recipient", 553, smtp.EnhancedCode{5, 6, 7},
			fmt.Sprintf("Recipient <%s>: %v", printable(to), err))
	}
	if err != nil {
		// RFC 3463: X.1.3 bad destination mailbox address syntax.
		return s.reject("bad_recipient", 501, smtp.EnhancedCode{5, 1, 3},
			fmt.Sprintf("Bad recipient address <%s>: %v", printable(to), err))
	}
	to = addr
	rp := queue.RecipientParams{Addr: to}
	for _, n := range opts.Notify {
		rp.Notify = append(rp.Notify, string(n))
	}
	if opts.OriginalRecipient != "" {
		// Stored decoded (xtext undone); whoever passes it on re-encodes it.
		rp.ORcpt = string(opts.OriginalRecipientType) + ";" + opts.OriginalRecipient
	}
	// The same recipient twice would be delivered twice.
	if !slices.ContainsFunc(s.tx.env.Recipients, func(r queue.RecipientParams) bool { return r.Addr == to }) {
		s.tx.env.Recipients = append(s.tx.env.Recipients, rp)
	}
	return nil
}

// reject counts and logs a refused command and returns the reply. The
// caller holds s.mu.
func (s *session) reject(reason string, code int, ec smtp.EnhancedCode, msg string) error {
	user := ""
	if s.user != nil {
		user = s.user.Name
	}
	return s.rejectAs(user, reason, &smtp.SMTPError{Code: code, EnhancedCode: ec, Message: msg})
}

func (s *session) rejectAs(user, reason string, e *smtp.SMTPError, attrs ...any) error {
	metricRejected.WithLabelValues(reason).Inc()
	attrs = append(attrs, "reason", reason,
		"reply", fmt.Sprintf("%d %d.%d.%d %s", e.Code, e.EnhancedCode[0], e.EnhancedCode[1], e.EnhancedCode[2], e.Message))
	if user != "" {
		attrs = append(attrs, "user", user)
	}
	s.log.Info("smtpin: rejected", attrs...)
	return s.refused(e)
}

// maxRefused is how many refusals a connection may collect, with no
// message accepted in between, before it is closed: as Postfix's
// smtpd_hard_error_limit (20), so that a client that only tries what it
// may not (MAIL without AUTH, AUTH without TLS, a locked-out password)
// gets no endless stream of replies, nor the log one line for each.
const maxRefused = 20

// refused counts e when it refuses for good (5xx), or is a refused AUTH,
// and at the limit cuts the connection, answering 421 instead.
func (s *session) refused(e *smtp.SMTPError) error {
	if e.Code < 500 && e.Code != 454 {
		return e // a temporary state of ours (452, 451), not the client's error
	}
	if n := s.conn.refusals.Add(1); n >= maxRefused {
		s.conn.cutOff("too many refused commands", "refused", n)
		return &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 7, 0}, Message: "Too many errors, closing connection"}
	}
	return e
}

func (s *session) Data(r io.Reader) error {
	err := s.data(r)
	if e, ok := err.(*smtp.SMTPError); !ok || e.Code != 250 {
		// go-smtp reads the rest of a rejected message after Data returns,
		// with no bound but the idle timeout; conn bounds it.
		s.conn.beginDrain()
	}
	return err
}

func (s *session) data(r io.Reader) error {
	if s.conn.cut.Load() {
		return errClosing
	}
	s.mu.Lock()
	if s.tx == nil || len(s.tx.env.Recipients) == 0 {
		s.mu.Unlock()
		return &smtp.SMTPError{Code: 503, EnhancedCode: smtp.EnhancedCode{5, 5, 1}, Message: "RCPT first"}
	}
	tx := *s.tx
	tx.env.Recipients = slices.Clone(tx.env.Recipients)
	s.mu.Unlock()

	s.conn.inData.Store(true)
	defer s.conn.inData.Store(false)
	return s.receive(tx, r)
}

// printable makes a client's address safe to echo in a reply and a log
// line: anything but printable ASCII becomes '?'.
func printable(s string) string {
	if len(s) > 300 {
		s = s[:300]
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e {
			return '?'
		}
		return r
	}, s)
}
