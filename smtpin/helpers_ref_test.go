package smtpin

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/queue"
)

// readHeaderRef, messageIDRef, isDotStringRef and traceHeadersRef are the
// first, plainer versions of readHeader, messageID, isDotString and
// traceHeaders: the references the faster ones must match.

func readHeaderRef(br *bufio.Reader, limit int) (*header, error) {
	h := &header{}
	var name string
	var value []byte
	finish := func() {
		switch {
		case strings.EqualFold(name, "Message-ID"):
			if !h.hasMessageID {
				h.messageID = messageIDRef(value)
			}
			h.hasMessageID = true
		case strings.EqualFold(name, "Date"):
			h.hasDate = true
		case strings.EqualFold(name, "TLS-Required"):
			if strings.EqualFold(string(bytes.TrimSpace(value)), "No") {
				h.tlsRequiredNo = true
			}
		}
		name, value = "", nil
	}
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			err = errLineTooLong
		}
		if err != nil && err != io.EOF {
			return nil, err
		}
		if len(h.raw)+len(line) > limit {
			return nil, errHeaderTooLarge
		}
		h.raw = append(h.raw, line...)
		content := bytes.TrimSuffix(line, []byte("\r\n"))
		switch {
		case len(line) == 0 || len(content) == 0:
			finish()
			return h, nil
		case content[0] == ' ' || content[0] == '\t':
			value = append(value, content...)
		default:
			finish()
			n, v, ok := bytes.Cut(content, []byte(":"))
			n = bytes.TrimRight(n, " \t")
			if !ok || !isFieldName(n) {
				return h, nil
			}
			name, value = string(n), append([]byte(nil), v...)
			if strings.EqualFold(name, "Received") {
				h.received++
			}
		}
		if err == io.EOF {
			finish()
			return h, nil
		}
	}
}

func messageIDRef(v []byte) string {
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

func isDotStringRef(s string) bool {
	for _, atom := range strings.Split(s, ".") {
		if atom == "" {
			return false
		}
		for _, r := range atom {
			if r < 0x80 && !strings.ContainsRune("!#$%&'*+-/=?^_`{|}~", r) &&
				!('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9') {
				return false
			}
		}
	}
	return true
}

// traceHeadersRef takes the Message-ID to add, which traceHeaders makes up.
func (s *session) traceHeadersRef(helo string, extended bool, env queue.Envelope, hdr *header, now time.Time, newID string) (string, string) {
	var b strings.Builder
	host := s.srv.opts.Hostname
	proto := "ESMTP"
	if env.SMTPUTF8 {
		proto = "UTF8SMTP"
	} else if !extended && s.tls == nil && env.User == "" {
		proto = "SMTP"
	}
	if s.tls != nil {
		proto += "S"
	}
	if env.User != "" {
		proto += "A"
	}
	client := s.client.String()
	if s.client.IsValid() {
		client = s.client.Unmap().WithZone("").String()
		if !s.client.Unmap().Is4() {
			client = "IPv6:" + client
		}
	}
	fmt.Fprintf(&b, "Received: from %s ([%s])\r\n", sanitizeHelo(helo), client)
	if s.tls != nil {
		fmt.Fprintf(&b, "\t(using %s with cipher %s)\r\n",
			tlsVersion(s.tls.Version), tls.CipherSuiteName(s.tls.CipherSuite))
	}
	if env.User != "" && s.srv.opts.ShowAuthUser {
		fmt.Fprintf(&b, "\t(authenticated user %s)\r\n", sanitizeComment(env.User))
	}
	fmt.Fprintf(&b, "\tby %s (stsrelay) with %s;\r\n\t%s\r\n", host, proto, now.Format(time.RFC1123Z))
	msgID := hdr.messageID
	if !hdr.hasMessageID {
		msgID = newID
		fmt.Fprintf(&b, "Message-ID: %s\r\n", msgID)
	}
	if !hdr.hasDate {
		fmt.Fprintf(&b, "Date: %s\r\n", now.Format(time.RFC1123Z))
	}
	return b.String(), msgID
}

// FuzzTextHelpersMatchReference holds readHeader, messageID, isDotString
// and appendTLSVersion to their references.
func FuzzTextHelpersMatchReference(f *testing.F) {
	for _, seed := range []string{
		"", " ", "<a@b>", "  <a@b>\r\n\t (comment)  ", "<a\x01b@c>", "<jörg@exämple>", "a\u00a0b\u0085c",
		"\xff\xfe<x>", strings.Repeat("<"+strings.Repeat("x", 60)+"> ", 20),
		"first.last", ".a", "a.", "a..b", "a b", "\"q\"", "jörg", "a\x7fb",
		"Message-Id: <a@b>\r\nDate: x\r\n\r\nbody\r\n", "TLS-Required:\r\n\tNO\r\n\r\n",
		"message-id: <a>\r\n (c)\r\nMESSAGE-ID: <b>\r\nX: y\r\n\r\n", " folded first\r\nDate: y\r\n",
		"Subject: x\r\nDate: y", "Message-ID:\r\n <" + strings.Repeat("y", 200) + ">\r\n\r\n",
		"Subject : x\r\nMessage-ID \t: <a@b>\r\n\r\n", " : x\r\n\r\n",
		"Received: a\r\n\tb\r\nreceived : c\r\nX-Received: d\r\nReceived: e\r\n\r\nReceived: f\r\n",
	} {
		f.Add([]byte(seed), uint16(tls.VersionTLS13))
	}
	f.Fuzz(func(t *testing.T, v []byte, version uint16) {
		// A small reader and limit, so that both long-line and size errors
		// come up.
		const limit = 300
		got, gerr := readHeader(bufio.NewReaderSize(bytes.NewReader(v), 64), limit)
		want, werr := readHeaderRef(bufio.NewReaderSize(bytes.NewReader(v), 64), limit)
		if gerr != werr || (werr == nil && (!bytes.Equal(got.raw, want.raw) || got.hasMessageID != want.hasMessageID ||
			got.messageID != want.messageID || got.hasDate != want.hasDate || got.tlsRequiredNo != want.tlsRequiredNo ||
			got.received != want.received)) {
			t.Errorf("readHeader(%q) = %+v, %v; reference %+v, %v", v, got, gerr, want, werr)
		}
		got.release()
		if got, want := messageID(v), messageIDRef(v); got != want {
			t.Errorf("messageID(%q) = %q, reference %q", v, got, want)
		}
		if got, want := isDotString(string(v)), isDotStringRef(string(v)); got != want {
			t.Errorf("isDotString(%q) = %v, reference %v", v, got, want)
		}
		if got, want := string(appendTLSVersion([]byte("x"), version)), "x"+tlsVersion(version); got != want {
			t.Errorf("appendTLSVersion(%#x) = %q, reference %q", version, got, want)
		}
	})
}

func TestTraceHeadersMatchReference(t *testing.T) {
	now := time.Date(2026, 12, 5, 12, 0, 7, 0, time.FixedZone("", -5*3600))
	tlsState := &tls.ConnectionState{Version: tls.VersionTLS13, CipherSuite: tls.TLS_AES_128_GCM_SHA256}
	for _, tc := range []struct {
		name   string
		client netip.Addr
		tls    *tls.ConnectionState
		show   bool
		helo   string
		helo1  bool // HELO, not EHLO
		env    queue.Envelope
		hdr    header
	}{
		{name: "plain, with Message-ID and Date", client: netip.MustParseAddr("192.0.2.1"), helo: "client.example",
			hdr: header{hasMessageID: true, messageID: "<a@b>", hasDate: true}},
		{name: "TLS, user shown, nothing in the header", client: netip.MustParseAddr("2001:db8::1"), tls: tlsState, show: true,
			helo: "[192.0.2.1]", env: queue.Envelope{User: "app(1)\\x"}},
		{name: "TLS 1.2, user not shown, SMTPUTF8", client: netip.MustParseAddr("::ffff:192.0.2.9"),
			tls:  &tls.ConnectionState{Version: tls.VersionTLS12, CipherSuite: tls.TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256},
			helo: "bad helo\r\n", env: queue.Envelope{User: "app", SMTPUTF8: true}, hdr: header{hasDate: true}},
		{name: "no HELO, no client", hdr: header{hasMessageID: true}},
		{name: "link-local client", client: netip.MustParseAddr("fe80::1%eth0"), helo: "client.example"},
		{name: "HELO", client: netip.MustParseAddr("192.0.2.1"), helo: "client.example", helo1: true},
		{name: "HELO, then AUTH", client: netip.MustParseAddr("192.0.2.1"), helo: "client.example", helo1: true, env: queue.Envelope{User: "app"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &session{srv: &Server{opts: Options{Hostname: "relay.example", ShowAuthUser: tc.show}}, client: tc.client, tls: tc.tls}
			got, gotID := s.traceHeaders(tc.helo, !tc.helo1, tc.env, &tc.hdr, now)
			want, wantID := s.traceHeadersRef(tc.helo, !tc.helo1, tc.env, &tc.hdr, now, gotID)
			if got != want || gotID != wantID {
				t.Errorf("got %q, %q\nwant %q, %q", got, gotID, want, wantID)
			}
			if !tc.hdr.hasMessageID && (!strings.HasPrefix(gotID, "<") || !strings.HasSuffix(gotID, "@relay.example>") || len(gotID) < 20) {
				t.Errorf("made-up Message-ID %q", gotID)
			}
		})
	}
}

// RFC 5321 §4.4: the client in a Received field is an address literal,
// an IPv6 one tagged (§4.1.3) and without the zone of a link-local one.
func TestReceivedNamesTheClientByAnAddressLiteral(t *testing.T) {
	for in, want := range map[string]string{
		"192.0.2.1":        "Received: from c.example ([192.0.2.1])\r\n",
		"::ffff:192.0.2.9": "Received: from c.example ([192.0.2.9])\r\n",
		"2001:db8::1":      "Received: from c.example ([IPv6:2001:db8::1])\r\n",
		"fe80::1%eth0":     "Received: from c.example ([IPv6:fe80::1])\r\n",
	} {
		s := &session{srv: &Server{opts: Options{Hostname: "relay.example"}}, client: netip.MustParseAddr(in)}
		got, _ := s.traceHeaders("c.example", true, queue.Envelope{}, &header{hasMessageID: true, hasDate: true}, time.Now())
		if !strings.HasPrefix(got, want) {
			t.Errorf("%s: %q, want it to begin %q", in, got, want)
		}
	}
}
