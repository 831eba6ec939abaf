package delivery

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/textproto"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/queue"
)

// pipelined sends the envelope as one group (RFC 2920 §3.1): MAIL, every
// RCPT and DATA in one write, DATA last, then reads the replies in order.
// Only a 354 to DATA lets the body follow. The outcomes are those of
// lockStep: the same per-recipient statuses, 421 and throttle handling.
func (x *txn) pipelined(group []string, body io.Reader) []queue.Status {
	s, t := x.s, x.s.e.opts.Timeouts
	n := len(x.job.Recipients)
	// RFC 5321 §4.5.3.2 gives each command its own timeout; for a group,
	// one deadline for all its replies, the sum of theirs (RFC 2920 §3.1
	// leaves the client to wait for the group).
	deadline := t.Mail + time.Duration(n)*t.Rcpt + t.DataInit
	probe := s.probe
	s.probe = false
	if probe {
		// A connection from the idle cache: RSET leads the group.
		group = append([]string{"RSET"}, group...)
		deadline += t.Command
	}
	s.conn.SetDeadline(time.Now().Add(deadline))
	defer func() {
		if s.conn != nil { // copyBody closes it when the body fails
			s.conn.SetDeadline(time.Time{})
		}
	}()
	if _, err := io.WriteString(s.replay, strings.Join(group, "\r\n")+"\r\n"); err != nil {
		if probe {
			if x.ctx.Err() != nil {
				// The cut closed it: the attempt ends here.
				return x.fail("after RSET", err)
			}
			x.stale = true
			return nil
		}
		return x.fail("after MAIL", err)
	}
	rd := s.replies()
	defer rd.release()
	if probe {
		if _, err := rd.read(250); err != nil {
			// Whatever the remote makes of the rest of the group, no
			// body follows, so it delivers nothing.
			if x.ctx.Err() != nil {
				// Lost to the cut's own close, not to an idle
				// connection gone stale: the attempt ends here.
				return x.fail("after RSET", err)
			}
			// Closed while idle, or a 421: the message goes on another
			// connection.
			x.stale = true
			return nil
		}
	}

	// fatal is a reply that ends the session: 421, or none at all.
	fatal := func(err error) bool {
		var se *smtp.SMTPError
		return err != nil && (!errors.As(err, &se) || se.Code == 421)
	}
	_, mailErr := rd.read(250)
	if fatal(mailErr) {
		return x.fail("after MAIL", mailErr)
	}
	for i := range n {
		_, err := rd.read(25)
		if mailErr != nil {
			// The RCPT replies of a refused MAIL say nothing more; they are
			// read to keep the replies in step.
			if fatal(err) {
				s.broken = true
				return x.fail("after MAIL", mailErr)
			}
			continue
		}
		if !x.rcpt(i, err) {
			return x.fail("after RCPT", err)
		}
	}
	_, dataErr := rd.read(354)
	switch {
	case dataErr == nil && (mailErr != nil || len(x.accepted) == 0):
		// RFC 2920 §3.1: DATA accepted with no recipient: send the lone
		// ".", whose reply delivers nothing; the refusals stand.
		s.conn.SetDeadline(time.Now().Add(t.DataFinal))
		if _, err := io.WriteString(s.replay, ".\r\n"); err != nil {
			s.broken = true
		} else if _, err := rd.read(250); fatal(err) {
			s.broken = true
		}
	case fatal(dataErr):
		s.broken = true
		if mailErr == nil && len(x.accepted) > 0 {
			return x.fail("after DATA", dataErr)
		}
	case dataErr != nil && mailErr == nil && len(x.accepted) > 0:
		return x.fail("after DATA", dataErr)
	case dataErr != nil && mailErr == nil:
		// As in lockStep, a transaction without recipients ends with RSET.
		rd.release()
		if s.rset() != nil {
			s.broken = true
		}
	}
	if mailErr != nil {
		// A reply to MAIL applies to every recipient of the transaction.
		return x.fail("after MAIL", mailErr)
	}
	if len(x.accepted) == 0 {
		return x.out
	}

	// The body, dot-stuffed byte for byte as go-smtp's DATA writer does
	// (dotWriter), and the final dot.
	dw := newDotWriter(s.bodyWriter())
	if st := x.copyBody(dw, body); st != nil {
		return st
	}
	s.conn.SetWriteDeadline(time.Now().Add(t.DataBlock))
	if err := dw.Close(); err != nil {
		return x.fail("after end of data", err)
	}
	x.sent = true
	s.conn.SetDeadline(time.Now().Add(t.DataFinal))
	reply, err := rd.read(250)
	if err == nil && rd.ahead() {
		// As in BDAT's group: a reply too many, so this one may be
		// another command's.
		s.broken = true
		err = errOutOfStep
	}
	if err != nil {
		return x.fail("after end of data", err)
	}
	return x.delivered(reply)
}

// replyReader reads replies from the stream go-smtp's Client reads, for
// the pipelined path.
type replyReader struct {
	s  *session
	br *bufio.Reader
	tp *textproto.Reader
}

// replies is the session's replyReader, made at its first pipelined
// transaction and kept for the next.
func (s *session) replies() *replyReader {
	if s.rd == nil {
		br := bufio.NewReader(s.replay)
		s.rd = &replyReader{s: s, br: br, tp: textproto.NewReader(br)}
	}
	return s.rd
}

// read reads one reply, each within its own byte budget as in lockStep.
// A code other than expect is an *smtp.SMTPError, as from go-smtp.
func (r *replyReader) read(expect int) (string, error) {
	r.s.conn.allow(maxReplyBytes)
	_, msg, err := readReply(r.tp, expect)
	var te *textproto.Error
	if errors.As(err, &te) {
		return msg, toSMTPError(te)
	}
	return msg, err
}

// errOutOfStep is a remote that sent more replies than a pipelined group
// had commands (RFC 2920 §3.1 matches them one for one).
var errOutOfStep = errors.New("the server sent more replies than commands; whether it took the message is unknown")

// ahead reports whether the remote has sent more than the replies read:
// after a transaction's last reply, nothing is due until the next command
// but a 421, which a server may send as it closes (the session then ends
// as after any 421, on the next command).
func (r *replyReader) ahead() bool {
	n := r.br.Buffered()
	if n == 0 {
		return false
	}
	b, _ := r.br.Peek(min(n, 3))
	return !strings.HasPrefix("421", string(b))
}

// release hands what was read ahead back to go-smtp's Client, which
// reads the stream from here on.
func (r *replyReader) release() {
	if r.s.replay == nil {
		return
	}
	if n := r.br.Buffered(); n > 0 {
		rest, _ := r.br.Peek(n)
		r.s.replay.pending = append(append([]byte(nil), rest...), r.s.replay.pending...)
		r.br.Discard(n)
	}
}

// toSMTPError is go-smtp's (v0.25.1) conversion of a reply that has not
// the expected code, so both paths map replies alike.
func toSMTPError(te *textproto.Error) *smtp.SMTPError {
	se := &smtp.SMTPError{Code: te.Code, Message: te.Msg}
	first, rest, ok := strings.Cut(te.Msg, " ")
	if !ok {
		return se
	}
	parts := strings.Split(first, ".")
	if len(parts) != 3 {
		return se
	}
	var code smtp.EnhancedCode
	for i, p := range parts {
		v, err := strconv.Atoi(p)
		if err != nil {
			return se
		}
		code[i] = v
	}
	se.EnhancedCode = code
	// RFC 2034 repeats the enhanced code on every line.
	se.Message = strings.ReplaceAll(rest, "\n"+first+" ", "\n")
	return se
}

// maxGroupBytes bounds a pipelined group. Writes block here, and RFC 2920
// §3.1 asks a client without non-blocking I/O to keep each group within the
// TCP window, lest both sides wait on a full buffer; a group of some 200
// recipients fits any window seen today.
const maxGroupBytes = 16 << 10

func groupFits(group []string) bool {
	n := 0
	for _, l := range group {
		n += len(l) + 2
	}
	return n <= maxGroupBytes
}

// envelopeCommands are the MAIL, RCPT and DATA lines of one transaction,
// with exactly the parameters go-smtp's Client.Mail and Client.Rcpt
// (v0.25.1) write for the same options and EHLO keywords; it fails where
// they would. TestEnvelopeCommandsMatchGoSMTP holds them to it.
func envelopeCommands(ext func(string) (bool, string), from string, mo *smtp.MailOptions, rcpts []queue.RecipientParams) ([]string, error) {
	has := func(k string) bool { ok, _ := ext(k); return ok }
	mail, err := mailCommand(has, from, mo)
	if err != nil {
		return nil, err
	}
	group := []string{mail}
	for _, r := range rcpts {
		l, err := rcptCommand(has, r.Addr, rcptOptions(r))
		if err != nil {
			return nil, err
		}
		group = append(group, l)
	}
	return append(group, "DATA"), nil
}

func mailCommand(has func(string) bool, from string, o *smtp.MailOptions) (string, error) {
	if strings.ContainsAny(from, "\r\n") {
		return "", errors.New("smtp: a line must not contain CR or LF")
	}
	var b strings.Builder
	fmt.Fprintf(&b, "MAIL FROM:<%s>", from)
	if has("8BITMIME") {
		b.WriteString(" BODY=8BITMIME")
	}
	if has("SIZE") && o.Size != 0 {
		fmt.Fprintf(&b, " SIZE=%v", o.Size)
	}
	if o.RequireTLS {
		if !has("REQUIRETLS") {
			return "", errors.New("smtp: server does not support REQUIRETLS")
		}
		b.WriteString(" REQUIRETLS")
	}
	if o.UTF8 {
		if !has("SMTPUTF8") {
			return "", errors.New("smtp: server does not support SMTPUTF8")
		}
		b.WriteString(" SMTPUTF8")
	}
	if has("DSN") {
		switch o.Return {
		case smtp.DSNReturnFull, smtp.DSNReturnHeaders:
			fmt.Fprintf(&b, " RET=%s", o.Return)
		case "":
		default:
			return "", errors.New("smtp: Unknown RET parameter value")
		}
		if o.EnvelopeID != "" {
			if !isPrintableASCII(o.EnvelopeID) {
				return "", errors.New("smtp: Malformed ENVID parameter value")
			}
			b.WriteString(" ENVID=" + xtext(o.EnvelopeID))
		}
	}
	if o.Auth != nil && has("AUTH") {
		b.WriteString(" AUTH=" + xtext(*o.Auth))
	}
	return b.String(), nil
}

func rcptCommand(has func(string) bool, to string, o *smtp.RcptOptions) (string, error) {
	if strings.ContainsAny(to, "\r\n") {
		return "", errors.New("smtp: a line must not contain CR or LF")
	}
	if !o.RequireRecipientValidSince.IsZero() || o.DeliverBy != nil || o.MTPriority != nil {
		return "", errors.New("RRVS, DELIVERBY and MT-PRIORITY are not written here")
	}
	var b strings.Builder
	fmt.Fprintf(&b, "RCPT TO:<%s>", to)
	if has("DSN") {
		if len(o.Notify) > 0 {
			if !notifySet(o.Notify) {
				return "", errors.New("smtp: Malformed NOTIFY parameter value")
			}
			vals := make([]string, len(o.Notify))
			for i, v := range o.Notify {
				vals[i] = string(v)
			}
			b.WriteString(" NOTIFY=" + strings.Join(vals, ","))
		}
		if o.OriginalRecipient != "" {
			// RFC 3461 §4.2 xtext; RFC 6533 §3 utf-8-addr-xtext, or
			// -unitext where SMTPUTF8 is offered.
			var enc string
			switch o.OriginalRecipientType {
			case smtp.DSNAddressTypeRFC822:
				if !isPrintableASCII(o.OriginalRecipient) {
					return "", errors.New("smtp: Illegal address")
				}
				enc = xtext(o.OriginalRecipient)
			case smtp.DSNAddressTypeUTF8:
				enc = utf8AddrText(o.OriginalRecipient, has("SMTPUTF8"))
			default:
				return "", errors.New("smtp: Unknown address type")
			}
			fmt.Fprintf(&b, " ORCPT=%s;%s", o.OriginalRecipientType, enc)
		}
	}
	return b.String(), nil
}

// notifySet is go-smtp's check: known values, each once, NEVER alone.
func notifySet(vals []smtp.DSNNotify) bool {
	seen := map[smtp.DSNNotify]bool{}
	for _, v := range vals {
		switch v {
		case smtp.DSNNotifyNever, smtp.DSNNotifyDelayed, smtp.DSNNotifyFailure, smtp.DSNNotifySuccess:
		default:
			return false
		}
		if seen[v] {
			return false
		}
		seen[v] = true
	}
	return !seen[smtp.DSNNotifyNever] || len(seen) == 1
}

// xtext encodes s as RFC 3461 §4 xtext ("+XX" for '+', '=', space and
// controls).
func xtext(s string) string {
	var b strings.Builder
	for _, c := range s {
		if c >= '!' && c <= '~' && c != '+' && c != '=' {
			b.WriteRune(c)
			continue
		}
		b.WriteString("+" + strings.ToUpper(strconv.FormatInt(int64(c), 16)))
	}
	return b.String()
}

// utf8AddrText encodes s as RFC 6533 §3 utf-8-addr-unitext (non-ASCII
// as it is) when unitext is set, else as utf-8-addr-xtext ("\x{HEX}").
func utf8AddrText(s string, unitext bool) string {
	var b strings.Builder
	for _, c := range s {
		switch {
		// QCHAR leaves out '+', '=' and '\', which begins an escape.
		case c >= '!' && c <= '~' && c != '+' && c != '=' && c != '\\':
			b.WriteRune(c)
		case unitext && c > 0x7f:
			b.WriteRune(c)
		default:
			b.WriteString(`\x{` + strings.ToUpper(strconv.FormatInt(int64(c), 16)) + "}")
		}
	}
	return b.String()
}
