package delivery

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"strconv"
	"sync"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/queue"
)

// maxChunk bounds a message sent with BDAT (RFC 3030). BDAT states the
// size before the data, so the message is read into memory first, and it
// goes as one chunk in the same write as the envelope. A larger message
// goes with DATA, which streams.
const maxChunk = 128 << 10

// chunkBufs hold the messages on their way out as one chunk; the slack
// leaves room for the line end readChunk may add.
var chunkBufs = sync.Pool{New: func() any { b := make([]byte, 0, maxChunk+2); return &b }}

// readChunk reads body into buf (emptied first) as BDAT carries it: the
// text a remote has after undoing DATA's transparency, that is what
// dotWriter sends without the stuffed dots and the final dot. A bare LF
// becomes CRLF and an open last line is ended; an empty text is one empty
// line. whole says all of it fit in limit bytes; if not, buf holds what
// was read so far, already converted, to go ahead of the rest with DATA
// (dotWriter leaves text it has converted unchanged).
func readChunk(buf []byte, body io.Reader, scratch []byte, limit int) (text []byte, whole bool, err error) {
	text = buf[:0]
	for {
		n, rerr := body.Read(scratch)
		p := scratch[:n]
		for len(p) > 0 {
			i := bytes.IndexByte(p, '\n')
			if i < 0 {
				text = append(text, p...)
				break
			}
			text = append(text, p[:i]...)
			if trailingCRs(text)%2 == 0 {
				text = append(text, '\r')
			}
			text = append(text, '\n')
			p = p[i+1:]
		}
		if len(text) > limit {
			return text, false, nil
		}
		switch {
		case rerr == io.EOF:
			switch k := trailingCRs(text); {
			case k%2 == 1:
				text = append(text, '\n')
			case len(text) == 0 || k > 0 || text[len(text)-1] != '\n':
				text = append(text, '\r', '\n')
			}
			return text, len(text) <= limit, nil
		case rerr != nil:
			return text, false, rerr
		}
	}
}

// trailingCRs counts the CRs b ends with. dotWriter, as textproto's
// DotWriter, takes a CR for the start of a line end only when the byte
// before it was not one taken so: of a run of CRs, the odd ones. An LF
// after an even run (none included) is bare and gets its CR.
func trailingCRs(b []byte) int {
	k := 0
	for k < len(b) && b[len(b)-1-k] == '\r' {
		k++
	}
	return k
}

// pipelinedOrChunked sends a message that fits in one chunk with BDAT
// where the remote offers CHUNKING (RFC 3030) and the operator did not
// turn it off, the rest with DATA. group ends with DATA.
func (x *txn) pipelinedOrChunked(group []string, body io.Reader) []queue.Status {
	s := x.s
	if ok, _ := s.client.Extension("CHUNKING"); !ok || s.e.opts.NoChunking || x.job.Size > maxChunk {
		return x.pipelined(group, body)
	}
	buf := chunkBufs.Get().(*[]byte)
	defer chunkBufs.Put(buf)
	scratch := copyBufs.Get().(*[]byte)
	text, whole, err := readChunk(*buf, body, *scratch, maxChunk)
	copyBufs.Put(scratch)
	*buf = text[:0] // keep a buffer that grew
	switch {
	case err != nil:
		// Nothing has been sent: the connection stays good.
		return x.abort(queue.Status{Code: 451, Enhanced: "4.3.0", Text: "reading the queued message: " + err.Error()}, true)
	case !whole:
		// Larger than its stored size said (a DKIM signature added, say).
		return x.pipelined(group, io.MultiReader(bytes.NewReader(text), body))
	}
	return x.chunked(group[:len(group)-1], text)
}

// chunked is pipelined with the message in one "BDAT n LAST" (RFC 3030
// §2, §4.2) written with the envelope: one write and one round trip for
// the whole transaction, where DATA needs two of each (the body waits for
// 354), and no dot-stuffing.
//
// The body is on its way before any reply is read, so the remote alone
// decides what becomes of it, and every reply is read and taken as it
// says. A 421 in particular ends nothing early: RFC 5321 §3.8 has the
// remote close after it, but one that reads on may still deliver, and
// only its later replies tell. Reading stops where the replies do.
func (x *txn) chunked(group []string, text []byte) []queue.Status {
	s, t := x.s, x.s.e.opts.Timeouts
	n := len(x.job.Recipients)
	// A remote may hold its replies until it has read the whole group
	// (Postfix does), so the first reply may wait for all of it: the
	// envelope's timeouts, the body's and the final reply's.
	deadline := t.Mail + time.Duration(n)*t.Rcpt + t.DataBlock + t.DataFinal
	probe := s.probe
	s.probe = false
	if probe {
		group = append([]string{"RSET"}, group...)
		deadline += t.Command
	}
	s.conn.SetDeadline(time.Now().Add(deadline))
	defer func() {
		if s.conn != nil {
			s.conn.SetDeadline(time.Time{})
		}
	}()
	w := s.bodyWriter()
	for _, l := range group {
		w.WriteString(l)
		w.WriteString("\r\n")
	}
	w.WriteString("BDAT " + strconv.Itoa(len(text)) + " LAST\r\n")
	w.Write(text)
	if err := w.Flush(); err != nil {
		// Not all of it left: the remote has no complete BDAT, so it
		// delivers nothing.
		s.broken = true
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
	x.sent = true
	rd := s.replies()
	defer rd.release()

	// closing is a 421 the remote sent (it may close now); a reply lost
	// after it is explained by it.
	var closing error
	refused := func(err error) (*smtp.SMTPError, bool) {
		var se *smtp.SMTPError
		if errors.As(err, &se) && se.Code == 421 && closing == nil {
			closing, s.broken = err, true
		}
		return se, se != nil
	}
	lost := func(step string, err error) []queue.Status {
		s.broken = true
		if closing != nil {
			err = closing
		}
		return x.fail(step, err)
	}
	if probe {
		if _, err := rd.read(250); err != nil {
			if _, ok := refused(err); !ok {
				if isTimeout(err) || x.ctx.Err() != nil {
					// Whether it read on is unknown: no second copy now.
					// A reply lost to the cut's own close says no more
					// than a timeout: the message is out.
					return lost("after RSET", err)
				}
				// Gone while idle: nothing of the group was read.
				x.stale, s.broken = true, true
				return nil
			}
		}
	}
	_, mailErr := rd.read(250)
	if mailErr != nil {
		if _, ok := refused(mailErr); !ok {
			if probe && closing != nil && x.ctx.Err() == nil {
				// RSET got 421 and the remote closed: it read no further.
				// (A read the cut's own close failed says no such thing.)
				x.stale = true
				return nil
			}
			return lost("after MAIL", mailErr)
		}
	}
	for i := range n {
		_, err := rd.read(25)
		se, ok := refused(err)
		switch {
		case err != nil && !ok:
			if mailErr != nil {
				return lost("after MAIL", mailErr)
			}
			return lost("after RCPT", err)
		case mailErr != nil:
			// The RCPT replies of a refused MAIL say nothing more.
		case ok && se.Code == 421:
			x.out[i] = smtpErrorStatus(s.label, se)
		default:
			x.rcpt(i, err)
		}
	}
	// The remote has answered the envelope; the final reply gets its own
	// timeout, as after DATA's final dot.
	s.conn.SetDeadline(time.Now().Add(t.DataFinal))
	reply, bdatErr := rd.read(250)
	if bdatErr == nil && rd.ahead() {
		// Replies matched to commands by count, and one too many came:
		// the one read as BDAT's may be another command's, and BDAT's
		// its refusal. Whether the remote took the message is unknown.
		return lost("after end of data", errOutOfStep)
	}
	if _, ok := refused(bdatErr); bdatErr != nil && !ok {
		if mailErr != nil {
			return lost("after MAIL", mailErr)
		}
		if len(x.accepted) == 0 {
			s.broken = true
			return x.out
		}
		return lost("after end of data", bdatErr)
	}
	if bdatErr != nil && !s.broken {
		// RFC 3030 §2: a refused BDAT fails the transaction. RSET leaves
		// no doubt about the remote's state for the next message.
		rd.release()
		if s.rset() != nil {
			s.broken = true
		}
	}
	switch {
	case mailErr != nil:
		// A reply to MAIL applies to every recipient of the transaction.
		return x.fail("after MAIL", mailErr)
	case len(x.accepted) == 0:
		// Every RCPT refused: the remote refuses BDAT too, or takes it and
		// delivers nothing (RFC 2920 §3.1). The refusals stand.
		return x.out
	case bdatErr != nil:
		return x.fail("after end of data", bdatErr)
	}
	return x.delivered(reply)
}

// bodyWriter is the session's buffered writer for the pipelined paths.
func (s *session) bodyWriter() *bufio.Writer {
	if s.bw == nil {
		// A TLS record's worth: a small message goes out in one write.
		s.bw = bufio.NewWriterSize(s.replay, 16<<10)
	}
	return s.bw
}
