package smtpin

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/queue"
)

// maxHeaderBytes bounds the header section read into memory to find
// Message-ID, Date and TLS-Required and to count Received.
const maxHeaderBytes = 256 << 10

// maxTextLine is the longest message line, CRLF included (RFC 5321
// §4.5.3.1.6, RFC 5322 §2.1.1: 998 octets before it). A longer line is
// refused at submission rather than relayed as it is (many servers would
// refuse or break it) or folded (which changes the message and breaks its
// DKIM signature): the client can encode it, a relay cannot.
const maxTextLine = 1000

// readerPool holds the readers of message text, one per message in
// progress.
var readerPool = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, 8192) }}

// Errors found in the message text.
var (
	errBareLF         = errors.New("bare LF")
	errBareCR         = errors.New("bare CR")
	errLineTooLong    = errors.New("line too long")
	errHeaderTooLarge = errors.New("header section too large")
	errTooLarge       = errors.New("message too large")
	errNUL            = errors.New("NUL byte")
)

// receive reads one message and commits it to the queue. It answers 250
// with the queue id only once Enqueue has returned without error.
func (s *session) receive(tx transaction, r io.Reader) error {
	start := time.Now()
	env := tx.env
	// A message declared BODY=8BITMIME is 8-bit already: its octets need
	// no looking at for that.
	rd := &submission{body: bodyReader{r: r, maxLine: s.maxTextLine(), max: s.srv.opts.MaxMessageSize, eightBit: env.Body8Bit}}
	body := &rd.body
	// maxTextLine is at most 1000, so one size of reader serves every
	// session; Enqueue has read all it wants before receive returns.
	br := readerPool.Get().(*bufio.Reader)
	br.Reset(body)
	defer func() { br.Reset(nil); readerPool.Put(br) }()
	hdr, err := readHeader(br, maxHeaderBytes)
	if err != nil {
		return s.dataError(env, body, err)
	}
	defer hdr.release() // after Enqueue, which reads hdr.raw, has returned
	if hdr.received > s.srv.opts.MaxHops {
		// RFC 5321 §6.3: counting Received fields finds a loop of relays;
		// RFC 3463 X.4.6: routing loop detected.
		return s.rejectAs(env.User, "loop", &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 4, 6},
			Message: fmt.Sprintf("Too many hops: %d Received fields, more than %d (mail loop)", hdr.received, s.srv.opts.MaxHops)})
	}
	// RFC 8689 §5: the header is ignored when REQUIRETLS was given.
	if hdr.tlsRequiredNo && !env.RequireTLS {
		env.NoTLSPolicy = true
	}
	trace, msgID := s.traceHeaders(tx.helo, tx.extended, env, &hdr, time.Now())
	env.MessageID = msgID
	msg := &rd.msg
	*msg = messageReader{trace: trace, raw: hdr.raw, rest: br}

	if !s.srv.enqueueBegin() {
		return s.rejectAs(env.User, "shutdown", &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2},
			Message: "Shutting down, try again later"})
	}
	id, err := s.srv.q.Enqueue(s.srv.baseCtx, env, rd)
	s.srv.enqueueEnd()
	if err != nil {
		if body.err != nil {
			return s.dataError(env, body, body.err) // the client's message, not the queue
		}
		s.log.Error("smtpin: queue did not store the message", "from", env.From,
			"rcpts", len(env.Recipients), "user", env.User, "err", err)
		if errors.Is(err, queue.ErrNoSpace) {
			// RFC 5321 §4.2.2 452 insufficient system storage; RFC 3463
			// X.3.1 mail system full. The client keeps the message.
			return s.rejectAs(env.User, "no_space", &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 3, 1},
				Message: "Insufficient system storage, try again later"})
		}
		return s.rejectAs(env.User, "queue", &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0},
			Message: "Could not store the message, try again later"})
	}
	if !body.eof {
		// Enqueue must read to the end; a short read would lose mail.
		s.log.Error("smtpin: queue stored a message without reading all of it", "id", id)
	}

	metricAccepted.Inc()
	tlsInfo := "none"
	if s.tls != nil {
		tlsInfo = tlsVersion(s.tls.Version)
	}
	// The one line per submission. size is what was stored, our Received
	// header included, as the queue shows it.
	// LogAttrs: the same record as Info with key-value pairs, without
	// boxing each value in an interface.
	s.log.LogAttrs(context.Background(), slog.LevelInfo, "smtpin: accepted", slog.String("id", id),
		slog.String("message_id", msgID), slog.String("from", env.From), slog.Int("rcpts", len(env.Recipients)),
		slog.Int64("size", msg.n), slog.String("user", env.User), slog.String("tls", tlsInfo),
		slog.Bool("requiretls", env.RequireTLS), slog.Bool("notlspolicy", env.NoTLSPolicy),
		slog.Duration("duration", time.Since(start).Round(time.Millisecond)))
	s.conn.refusals.Store(0) // a client that gets mail through is no prober
	// go-smtp sends an SMTPError as the reply, even a 250.
	return &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0}, Message: "Ok: queued as " + id}
}

// dataError turns a failure while reading the message into the reply.
func (s *session) dataError(env queue.Envelope, body *bodyReader, err error) error {
	line := body.lines + 1
	var netErr net.Error
	var e *smtp.SMTPError
	switch {
	case errors.Is(err, errTooLarge), errors.Is(err, smtp.ErrDataTooLarge):
		return s.rejectAs(env.User, "size", &smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 3, 4},
			Message: fmt.Sprintf("Message is larger than the limit of %d bytes", s.srv.opts.MaxMessageSize)})
	case errors.Is(err, errHeaderTooLarge):
		return s.rejectAs(env.User, "header_size", &smtp.SMTPError{Code: 552, EnhancedCode: smtp.EnhancedCode{5, 3, 4},
			Message: fmt.Sprintf("Header section is larger than the limit of %d bytes", maxHeaderBytes)})
	case errors.Is(err, errBareLF), errors.Is(err, errBareCR):
		// SMTP smuggling: a lone CR or LF could end the message for a
		// server further on. RFC 5321 §2.3.8: lines end in CRLF only.
		reason := "bare_lf"
		if errors.Is(err, errBareCR) {
			reason = "bare_cr"
		}
		return s.rejectAs(env.User, reason, &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 5, 2},
			Message: fmt.Sprintf("Message line %d contains a %s; lines must end with CRLF (RFC 5321 §2.3.8)", line, err)})
	case errors.Is(err, errNUL):
		// RFC 2045 §2.7, §2.8: 7bit and 8bit data hold no NUL; only
		// BINARYMIME, which is not offered, would allow it. Software that
		// reads C strings would see the message end early.
		return s.rejectAs(env.User, "nul", &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0},
			Message: fmt.Sprintf("Message line %d contains a NUL byte, which mail text may not hold (RFC 2045 §2.8)", line)})
	case errors.Is(err, errLineTooLong), errors.Is(err, smtp.ErrTooLongLine):
		return s.rejectAs(env.User, "line_length", &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0},
			Message: fmt.Sprintf("Message line %d is longer than %d octets (RFC 5321 §4.5.3.1.6); encode it (quoted-printable or base64)",
				line, s.maxTextLine()-2)})
	case errors.As(err, &netErr) && netErr.Timeout():
		s.conn.expired.Store(true)
		return s.rejectAs(env.User, "timeout", &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 4, 2},
			Message: "Timeout while receiving the message"})
	case errors.As(err, &e):
		return s.rejectAs(env.User, "other", e)
	default:
		// The client went away (EOF, RSET during BDAT): nobody hears a reply.
		metricRejected.WithLabelValues("aborted").Inc()
		s.log.Info("smtpin: message transfer aborted", "err", err, "user", env.User)
		return err
	}
}

// maxTextLine is the longest message line accepted, CRLF included.
func (s *session) maxTextLine() int { return min(maxTextLine, s.srv.opts.MaxLineLength) }

// bodyReader checks the message text as it passes: at most max bytes,
// lines end in CRLF and are at most maxLine bytes long, no NUL. It also
// makes a message sent by BDAT without a final CRLF end with one. The
// first error sticks.
type bodyReader struct {
	r       io.Reader
	maxLine int
	max     int64

	n        int64 // bytes read from the client
	lines    int   // complete lines read
	lineLen  int
	last     byte
	eightBit bool // an octet above 127 was read, or BODY=8BITMIME said there would be
	eof      bool
	tail     string // "\r\n" still to add at the end
	err      error
}

func (b *bodyReader) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	if b.eof {
		if b.tail == "" {
			return 0, io.EOF
		}
		n := copy(p, b.tail)
		b.tail = b.tail[n:]
		return n, nil
	}
	n, err := b.r.Read(p)
	if e := b.check(p[:n]); e != nil {
		b.err = e
		return 0, e
	}
	if !b.eightBit {
		b.eightBit = has8Bit(p[:n])
	}
	b.n += int64(n)
	if b.n > b.max {
		// RFC 1870: the size is that of the message, without dot-stuffing
		// and the final dot; a message of exactly max bytes is accepted.
		b.err = errTooLarge
		return 0, b.err
	}
	switch {
	case err == io.EOF:
		b.eof = true
		if b.last == '\r' {
			b.err = errBareCR
			return 0, b.err
		}
		if b.n > 0 && b.last != '\n' {
			b.tail = "\r\n"
		}
		if n > 0 || b.tail != "" {
			return n, nil
		}
		return 0, io.EOF
	case err != nil:
		b.err = err
		return 0, err
	}
	return n, nil
}

// check runs the checks over the next bytes of the message and advances
// lines, lineLen and last. It scans a line at a time with bytes.IndexByte
// rather than a byte at a time; the result is what a byte-wise check gives
// (bodyReaderRef in the tests is that check, FuzzBodyReaderMatchesReference
// compares them): the error at the earliest byte, and at one byte the
// first of bare CR, bare LF, NUL, line too long. lines is not advanced past
// the line that holds the error, which the reply names.
func (b *bodyReader) check(s []byte) error {
	nul := bytes.IndexByte(s, 0) // -1 or the first NUL: most chunks have none
	for i := 0; i < len(s); {
		if b.last == '\r' {
			// A CR that ended the previous chunk.
			if s[i] != '\n' {
				return errBareCR
			}
			if b.lineLen+1 > b.maxLine {
				return errLineTooLong
			}
			b.lines++
			b.lineLen, b.last = 0, '\n'
			i++
			continue
		}
		// seg is the rest of the line up to its LF (excluded) or to the end
		// of s. Positions below are in seg; position len(seg) is the LF.
		seg := s[i:]
		lf := bytes.IndexByte(seg, '\n')
		if lf >= 0 {
			seg = seg[:lf]
		}
		end := len(seg) // positions < end are looked at
		if lf >= 0 {
			end++
		}
		// The earliest error; at one position the one found first here
		// wins, so they are looked for in order of precedence.
		at, err := end, error(nil)
		if cr := bytes.IndexByte(seg, '\r'); cr >= 0 && cr+1 < len(seg) {
			at, err = cr+1, errBareCR // the byte after a CR is not LF
		}
		if lf >= 0 && len(seg) < at {
			prev := b.last
			if len(seg) > 0 {
				prev = seg[len(seg)-1]
			}
			if prev != '\r' {
				at, err = len(seg), errBareLF
			}
		}
		if nul >= i && nul-i < at {
			at, err = nul-i, errNUL
		}
		if long := max(b.maxLine-b.lineLen, 0); long < at {
			err = errLineTooLong // the byte at which lineLen passes maxLine
		}
		if err != nil {
			return err
		}
		if lf >= 0 {
			b.lines++
			b.lineLen, b.last = 0, '\n'
			i += lf + 1
			continue
		}
		if len(seg) > 0 {
			b.lineLen += len(seg)
			b.last = seg[len(seg)-1]
		}
		i = len(s)
	}
	return nil
}

// has8Bit reports whether an octet of s is above 127. Every message
// passes here whole, so it ORs eight octets at a time, 128 per round into
// four words that do not wait on each other, and tests the high bits once
// at the end.
func has8Bit(s []byte) bool {
	le := binary.LittleEndian
	var a, b, c, d uint64
	for ; len(s) >= 128; s = s[128:] {
		w := s[:128]
		a |= le.Uint64(w[0:8]) | le.Uint64(w[8:16]) | le.Uint64(w[16:24]) | le.Uint64(w[24:32])
		b |= le.Uint64(w[32:40]) | le.Uint64(w[40:48]) | le.Uint64(w[48:56]) | le.Uint64(w[56:64])
		c |= le.Uint64(w[64:72]) | le.Uint64(w[72:80]) | le.Uint64(w[80:88]) | le.Uint64(w[88:96])
		d |= le.Uint64(w[96:104]) | le.Uint64(w[104:112]) | le.Uint64(w[112:120]) | le.Uint64(w[120:128])
	}
	for ; len(s) >= 8; s = s[8:] {
		a |= le.Uint64(s)
	}
	for _, x := range s {
		a |= uint64(x)
	}
	return (a|b|c|d)&0x8080808080808080 != 0
}

// messageReader is what Enqueue reads: our trace header, the header
// section as read, then the rest of the message; it counts the bytes.
// (io.MultiReader of a strings.Reader and a bytes.Reader, in one value.)
type messageReader struct {
	trace string
	raw   []byte
	rest  io.Reader
	n     int64
}

// submission is the readers of one message, in one allocation; Enqueue
// reads msg through it.
type submission struct {
	body bodyReader
	msg  messageReader
}

func (sub *submission) Read(p []byte) (int, error) { return sub.msg.Read(p) }

// Body8Bit reports whether the client's text held 8-bit octets, once it
// has been read to its end (queue.Body8BitReporter): RFC 6152 §3 keeps
// such a message from servers without 8BITMIME, and many clients send it
// without BODY=8BITMIME. Our own header lines are ASCII.
func (sub *submission) Body8Bit() bool { return sub.body.eightBit }

func (m *messageReader) Read(p []byte) (int, error) {
	var n int
	switch {
	case len(m.trace) > 0:
		n = copy(p, m.trace)
		m.trace = m.trace[n:]
	case len(m.raw) > 0:
		n = copy(p, m.raw)
		m.raw = m.raw[n:]
	default:
		n, err := m.rest.Read(p)
		m.n += int64(n)
		return n, err
	}
	m.n += int64(n)
	return n, nil
}

// maxMessageIDLen bounds the Message-ID kept for logs and the queue; RFC
// 5322 §2.1.1 bounds a line at 998 characters.
const maxMessageIDLen = 998

// header is what the submission's header section says, as far as we care.
type header struct {
	raw           []byte  // the bytes read, passed on unchanged
	pooled        *[]byte // the rawPool buffer raw lives in, for release
	hasMessageID  bool
	messageID     string // the first Message-ID field's body, unfolded
	hasDate       bool
	tlsRequiredNo bool // "TLS-Required: No" (RFC 8689 §5)
	received      int  // Received fields: hops so far (RFC 5321 §6.3)
}

// rawPool holds the buffers of header sections. A buffer goes back when
// the message has been read: receive passes raw to Enqueue, which reads
// all it wants before it returns (Enqueuer), and releases it only then.
var rawPool = sync.Pool{New: func() any { b := make([]byte, 0, 4096); return &b }}

// maxPooledRaw bounds the buffers kept in rawPool: a rare large header
// section does not stay in memory.
const maxPooledRaw = 64 << 10

// release gives raw back to rawPool; h.raw must no longer be read.
func (h *header) release() {
	if h.pooled != nil && cap(h.raw) <= maxPooledRaw {
		*h.pooled = h.raw[:0]
		rawPool.Put(h.pooled)
	}
	h.raw, h.pooled = nil, nil
}

// field is a header field readHeader looks at.
type field uint8

const (
	fieldOther field = iota
	fieldMessageID
	fieldDate
	fieldTLSRequired
	fieldReceived
)

// fieldOf names a field without making a string of its name.
func fieldOf(name []byte) field {
	switch {
	case bytes.EqualFold(name, []byte("Message-ID")):
		return fieldMessageID
	case bytes.EqualFold(name, []byte("Date")):
		return fieldDate
	case bytes.EqualFold(name, []byte("TLS-Required")):
		return fieldTLSRequired
	case bytes.EqualFold(name, []byte("Received")):
		return fieldReceived
	}
	return fieldOther
}

// readHeader reads the header section (RFC 5322 §2.2), up to limit bytes.
// It ends at the empty line, or at the first line that is not a header
// field, which then belongs to the body (as Postfix treats it). The caller
// releases the header when raw has been read.
func readHeader(br *bufio.Reader, limit int) (header, error) {
	bp := rawPool.Get().(*[]byte)
	h := header{raw: (*bp)[:0], pooled: bp}
	var name field // the field being read, across folded lines
	// The body of a field we keep (Message-ID, TLS-Required), copied out
	// of br's buffer, which the next line overwrites.
	var valueBuf [128]byte
	value := valueBuf[:0]
	keep := false
	finish := func() {
		switch name {
		case fieldMessageID:
			if !h.hasMessageID {
				h.messageID = messageID(value)
			}
			h.hasMessageID = true
		case fieldDate:
			h.hasDate = true
		case fieldTLSRequired:
			if bytes.EqualFold(bytes.TrimSpace(value), []byte("No")) {
				h.tlsRequiredNo = true
			}
		}
		name, value, keep = fieldOther, value[:0], false
	}
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			err = errLineTooLong // bodyReader stops long lines first; belt and braces
		}
		if err != nil && err != io.EOF {
			h.release()
			return header{}, err
		}
		if len(h.raw)+len(line) > limit {
			h.release()
			return header{}, errHeaderTooLarge
		}
		h.raw = append(h.raw, line...)
		content := bytes.TrimSuffix(line, []byte("\r\n"))
		switch {
		case len(line) == 0 || len(content) == 0:
			finish() // end of data, or the empty line before the body
			return h, nil
		case content[0] == ' ' || content[0] == '\t':
			if keep {
				value = append(value, content...) // folded (RFC 5322 §2.2.3)
			}
		default:
			finish()
			n, v, ok := bytes.Cut(content, []byte(":"))
			// RFC 5322 §4.5.3: obs-optional allows white space between
			// the name and the colon ("Subject : x"), and a receiver must
			// take it as a field; else a Message-ID below would be missed.
			for len(n) > 0 && (n[len(n)-1] == ' ' || n[len(n)-1] == '\t') {
				n = n[:len(n)-1]
			}
			if !ok || !isFieldName(n) {
				return h, nil // not a header field: the body has begun
			}
			name = fieldOf(n)
			if name == fieldReceived {
				h.received++
			}
			keep = name == fieldMessageID && !h.hasMessageID || name == fieldTLSRequired
			if keep {
				value = append(value, v...)
			}
		}
		if err == io.EOF {
			finish()
			return h, nil
		}
	}
}

// messageID cleans a Message-ID field body for logs: unfolded, printable
// ASCII only, bounded. Words are joined by one space; a character outside
// printable ASCII becomes '?'.
func messageID(v []byte) string {
	for _, c := range v {
		if c >= 0x80 {
			return messageIDUTF8(v)
		}
	}
	// ASCII: the words are what strings.Fields finds, split at ASCII space.
	var b strings.Builder
	b.Grow(min(len(v), maxMessageIDLen))
	for len(v) > 0 && b.Len() < maxMessageIDLen {
		i := 0
		for i < len(v) && asciiSpace[v[i]] {
			i++
		}
		if i == len(v) {
			break
		}
		j := i
		for j < len(v) && !asciiSpace[v[j]] {
			j++
		}
		if b.Len() > 0 {
			b.WriteByte(' ')
		}
		for _, c := range v[i:j] {
			if b.Len() == maxMessageIDLen {
				break
			}
			if c < 0x20 || c > 0x7e {
				c = '?'
			}
			b.WriteByte(c)
		}
		v = v[j:]
	}
	return b.String()
}

// asciiSpace is the ASCII white space of unicode.IsSpace.
var asciiSpace = [256]bool{'\t': true, '\n': true, '\v': true, '\f': true, '\r': true, ' ': true}

// messageIDUTF8 is messageID for a body with bytes outside ASCII: Unicode
// white space separates words too, and a multi-byte character becomes one
// '?'.
func messageIDUTF8(v []byte) string {
	id := strings.Join(strings.Fields(string(v)), " ")
	id = strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e {
			return '?'
		}
		return r
	}, id)
	if len(id) > maxMessageIDLen {
		id = id[:maxMessageIDLen]
	}
	return id
}

// isFieldName: RFC 5322 §3.6.8, printable US-ASCII except colon.
func isFieldName(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	for _, c := range b {
		if c < 33 || c > 126 {
			return false
		}
	}
	return true
}

// traceHeaders returns the Received header (RFC 5321 §4.4) and, as Postfix
// does for submission, a Message-ID and Date when the message has none;
// and the message's Message-ID, its own or the one added. extended says
// the client greeted with EHLO.
func (s *session) traceHeaders(helo string, extended bool, env queue.Envelope, hdr *header, now time.Time) (string, string) {
	// Appended to a buffer on the stack: one allocation, the string.
	b := make([]byte, 0, 512)
	host := s.srv.opts.Hostname

	b = append(b, "Received: from "...)
	b = append(b, sanitizeHelo(helo)...)
	b = append(b, " (["...)
	b = appendAddressLiteral(b, s.client)
	b = append(b, "])\r\n"...)
	if s.tls != nil {
		b = append(b, "\t(using "...)
		b = appendTLSVersion(b, s.tls.Version)
		b = append(b, " with cipher "...)
		b = append(b, tls.CipherSuiteName(s.tls.CipherSuite)...)
		b = append(b, ")\r\n"...)
	}
	if env.User != "" && s.srv.opts.ShowAuthUser {
		b = append(b, "\t(authenticated user "...)
		b = append(b, sanitizeComment(env.User)...)
		b = append(b, ")\r\n"...)
	}
	b = append(b, "\tby "...)
	b = append(b, host...)
	b = append(b, " (stsrelay) with "...)
	// RFC 3848 and RFC 6531 §3.7.3: with-protocol names. "SMTP" is a
	// client that said HELO and used no extension: no STARTTLS, no AUTH.
	switch {
	case env.SMTPUTF8:
		b = append(b, "UTF8SMTP"...)
	case !extended && s.tls == nil && env.User == "":
		b = append(b, "SMTP"...)
	default:
		b = append(b, "ESMTP"...)
	}
	if s.tls != nil {
		b = append(b, 'S')
	}
	if env.User != "" {
		b = append(b, 'A')
	}
	b = append(b, ";\r\n\t"...)
	b = now.AppendFormat(b, time.RFC1123Z)
	b = append(b, "\r\n"...)
	msgID := hdr.messageID
	if !hdr.hasMessageID {
		msgID = "<" + rand.Text() + "@" + host + ">"
		b = append(b, "Message-ID: "...)
		b = append(b, msgID...)
		b = append(b, "\r\n"...)
	}
	if !hdr.hasDate {
		b = append(b, "Date: "...)
		b = now.AppendFormat(b, time.RFC1123Z)
		b = append(b, "\r\n"...)
	}
	return string(b), msgID
}

// appendAddressLiteral appends the inside of the address literal that
// names a client in TCP-info (RFC 5321 §4.4, §4.1.3): "192.0.2.1", or
// "IPv6:2001:db8::1" without a zone; an IPv4 client on a dual-stack
// socket is IPv4.
func appendAddressLiteral(b []byte, a netip.Addr) []byte {
	if !a.IsValid() {
		return append(b, a.String()...)
	}
	a = a.Unmap().WithZone("")
	if a.Is6() {
		b = append(b, "IPv6:"...)
	}
	return a.AppendTo(b)
}

// sanitizeHelo keeps the client's HELO name from breaking the header:
// characters outside a host name or address literal become '?'.
func sanitizeHelo(helo string) string {
	if helo == "" {
		return "unknown"
	}
	if len(helo) > 255 {
		helo = helo[:255]
	}
	return strings.Map(func(r rune) rune {
		if 'a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9' || strings.ContainsRune(".-_:[]", r) {
			return r
		}
		return '?'
	}, helo)
}

// sanitizeComment keeps text safe inside a header comment.
func sanitizeComment(s string) string {
	return strings.Map(func(r rune) rune {
		if r < 0x21 || r > 0x7e || r == '(' || r == ')' || r == '\\' {
			return '?'
		}
		return r
	}, s)
}

// tlsVersion names a TLS version the way Postfix's Received does: "TLSv1.3".
func tlsVersion(v uint16) string {
	return strings.Replace(tls.VersionName(v), "TLS ", "TLSv", 1)
}

// appendTLSVersion appends tlsVersion(v) without making the string.
func appendTLSVersion(b []byte, v uint16) []byte {
	name := tls.VersionName(v)
	if i := strings.Index(name, "TLS "); i >= 0 {
		return append(append(append(b, name[:i]...), "TLSv"...), name[i+4:]...)
	}
	return append(b, name...)
}
