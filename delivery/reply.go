package delivery

import (
	"fmt"
	"net/textproto"
	"strconv"
	"strings"
)

// readReply is textproto.Reader.ReadResponse with the reply's text
// optional. RFC 5321 §4.2 has "Reply-code [ SP textstring ] CRLF", and
// textproto calls a bare "250" a short response: after the final dot that
// deferred a message the remote had taken, and it was sent again at every
// retry. In a multiline reply a bare code is the last line, and so is a
// line with another code and no hyphen. go-smtp's client reads bare codes
// the same way (third_party/go-smtp, README.md).
func readReply(r *textproto.Reader, expectCode int) (code int, msg string, err error) {
	line, err := r.ReadLine()
	if err != nil {
		return 0, "", err
	}
	code, continued, msg, err := parseReplyLine(line, expectCode)
	if _, ok := err.(textproto.ProtocolError); ok {
		return code, msg, err
	}
	multi := continued
	for continued {
		line, rerr := r.ReadLine()
		if rerr != nil {
			return 0, "", rerr
		}
		code2, cont, more, perr := parseReplyLine(line, 0)
		if perr != nil || code2 != code && cont {
			// As textproto: a stray line is text, and the reply goes on.
			msg += "\n" + strings.TrimRight(line, "\r\n")
			continue
		}
		msg += "\n" + more
		continued = cont
		if code2 != code {
			// A last line with another code (RFC 5321 §4.2.1 wants one
			// code on every line) still ends the reply, and its code is
			// the reply's, as Postfix reads it. textproto reads on: the
			// next reply's lines become this one's, and every later reply
			// of a pipelined group answers the wrong command.
			code = code2
			_, _, _, err = parseReplyLine(line, expectCode)
		}
	}
	if err != nil && multi && msg != "" {
		err = &textproto.Error{Code: code, Msg: msg}
	}
	return code, msg, err
}

// parseReplyLine is textproto's parseCodeLine, taking a bare code as a
// last line with no text.
func parseReplyLine(line string, expectCode int) (code int, continued bool, msg string, err error) {
	if len(line) == 3 {
		line += " "
	}
	if len(line) < 4 || line[3] != ' ' && line[3] != '-' {
		return 0, false, "", textproto.ProtocolError(fmt.Sprintf("short response: %q", line))
	}
	continued = line[3] == '-'
	code, err = strconv.Atoi(line[0:3])
	if err != nil || code < 100 {
		return 0, false, "", textproto.ProtocolError(fmt.Sprintf("invalid response code: %q", line))
	}
	msg = line[4:]
	if 1 <= expectCode && expectCode < 10 && code/100 != expectCode ||
		10 <= expectCode && expectCode < 100 && code/10 != expectCode ||
		100 <= expectCode && expectCode < 1000 && code != expectCode {
		err = &textproto.Error{Code: code, Msg: msg}
	}
	return code, continued, msg, err
}
