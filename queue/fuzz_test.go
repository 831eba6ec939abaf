package queue

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"mime/multipart"
	"net/mail"
	"net/textproto"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

// FuzzDSN generates a DSN from arbitrary envelope, status and message
// text, parses it back with net/mail and mime/multipart, and checks what
// every DSN must be (RFC 3464, RFC 6522): one header section with no
// injected field, three parts of the right types, one per-message block
// and one block per recipient with the right fields, CRLF line ends,
// lines of our own within 998 characters, valid UTF-8 from valid UTF-8,
// and the original's header section (or the whole original) intact.
func FuzzDSN(f *testing.F) {
	f.Add("alice@example.com", "bob@example.org", "rfc822;bob@example.org", 550, "5.1.1", "mx.example.org: 5.1.1 <bob@example.org>: user unknown", "mx.example.org", "env-1", "FULL", byte(0), testBody)
	f.Add("jörg@example.com", "ünï@example.org", "", 451, "4.4.1", "mx.example.org[192.0.2.1]: connection refused", "", "", "", byte(1), "Subject: x\r\n\r\nbody\r\n")
	f.Add("a@b", "c@d", "", 250, "2.0.0", "ok", "mx", "", "HDRS", byte(2), "no header section at all")
	f.Add("x\r\nBcc: evil@example.com", "y\r\nAction: delivered\r\n", "utf-8;\r\n", 0, "", "\r\n\r\n", "\n", "\x00", "FULL", byte(3), "A: b\r\n\r\n")
	f.Add(strings.Repeat("é", 600)+"@example.com", "r@example.org", "", 550, "5.0.0", strings.Repeat("ü", 700), "", strings.Repeat("e", 1000), "", byte(0), "")

	dir := f.TempDir()
	db, err := OpenDB(filepath.Join(dir, "stsrelay.db"))
	if err != nil {
		f.Fatal(err)
	}
	q, err := New(db, Options{Deliverer: newScripted(all(ok250)), Hostname: "relay.test", Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { q.Close(); db.Close() })
	arrived := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

	f.Fuzz(func(t *testing.T, from, rcpt, orcpt string, code int, enhanced, text, lastMX, envID, ret string, action byte, original string) {
		original = asSubmitted(original)
		actions := []string{"failed", "delayed", "delivered", "relayed"}
		act := actions[int(action)%len(actions)]
		m := &message{
			ID:       "FUZZ" + strings.Repeat("0", 16),
			Envelope: Envelope{From: from, EnvID: envID, Ret: ret, SMTPUTF8: true},
			Size:     int64(len(original)),
			Arrived:  arrived,
		}
		r := dsnRecipient{Action: act, recipient: recipient{
			RecipientParams: RecipientParams{Addr: rcpt, ORcpt: orcpt},
			Last:            Status{Code: code, Enhanced: enhanced, Text: text, RemoteMTA: lastMX},
			LastMX:          lastMX,
			LastAttempt:     arrived.Add(time.Hour),
		}}
		body, err := q.dsnBody(m, []dsnRecipient{r, r}, "<fuzz.dsn@relay.test>", arrived.Add(2*time.Hour), []byte(original))
		if err != nil {
			t.Fatal(err)
		}
		// RFC 3461 §4.3: RET=FULL returns the whole message, on failure
		// only; RFC 8689 §5: never for a REQUIRETLS message.
		full := r.Action == "failed" && strings.EqualFold(m.Envelope.Ret, "FULL") && !m.Envelope.RequireTLS
		checkDSN(t, body, full, m, r, original)
		checkSevenBit(t, body)
	})
}

// checkSevenBit re-encodes a DSN as for an MX without 8BITMIME and checks
// that it is 7-bit, has CRLF line ends only, and says what the DSN said:
// the same header section, the same parts decoded, of the same types but
// for a returned 8-bit message/rfc822, now message/global.
func checkSevenBit(t *testing.T, dsn []byte) {
	t.Helper()
	seven, err := SevenBitDSN(dsn)
	if end := bytes.Index(dsn, []byte("\r\n\r\n")); !asciiBytes(dsn[:end]) {
		// A DSN to a UTF-8 sender: it needs SMTPUTF8, which delivery
		// asks of the MX before 8BITMIME.
		if err == nil {
			t.Fatalf("re-encoded a DSN with a UTF-8 header section:\n%s", seven)
		}
		return
	}
	if err != nil {
		t.Fatalf("SevenBitDSN: %v\nDSN:\n%s", err, dsn)
	}
	for k, c := range seven {
		if c >= 0x80 || c == '\n' && (k == 0 || seven[k-1] != '\r') || c == '\r' && (k+1 == len(seven) || seven[k+1] != '\n') {
			t.Fatalf("octet %#x at %d of the re-encoded DSN:\n%s", c, k, seven)
		}
	}
	if asciiBytes(dsn) && !bytes.Equal(seven, dsn) {
		t.Fatalf("a 7-bit DSN changed:\n%s\nwas\n%s", seven, dsn)
	}
	type part struct{ ct, content string }
	parts := func(b []byte) (textproto.MIMEHeader, []part) {
		msg, err := mail.ReadMessage(bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		_, params, _ := mime.ParseMediaType(msg.Header.Get("Content-Type"))
		mr := multipart.NewReader(msg.Body, params["boundary"])
		var ps []part
		for {
			p, err := mr.NextPart() // quoted-printable decoded
			if err == io.EOF {
				return textproto.MIMEHeader(msg.Header), ps
			}
			if err != nil {
				t.Fatalf("part %d: %v\n%s", len(ps)+1, err, b)
			}
			c, err := io.ReadAll(p)
			if err != nil {
				t.Fatalf("part %d: %v\n%s", len(ps)+1, err, b)
			}
			ps = append(ps, part{p.Header.Get("Content-Type"), string(c)})
		}
	}
	h0, was := parts(dsn)
	h1, got := parts(seven)
	if h1["Content-Transfer-Encoding"] != nil {
		t.Fatalf("the re-encoded DSN declares %q", h1["Content-Transfer-Encoding"])
	}
	delete(h0, "Content-Transfer-Encoding")
	if fmt.Sprint(h0) != fmt.Sprint(h1) || len(was) != len(got) {
		t.Fatalf("re-encoded DSN %v with %d parts, was %v with %d", h1, len(got), h0, len(was))
	}
	for i := range was {
		want := was[i]
		if want.ct == "message/rfc822" && !asciiBytes([]byte(want.content)) {
			want.ct = "message/global"
		}
		if got[i] != want {
			t.Fatalf("part %d re-encoded is %+v, was %+v", i+1, got[i], was[i])
		}
	}
}

// asSubmitted makes s what smtpin could have stored: CRLF line ends only,
// no NUL, lines of at most 2000 bytes.
func asSubmitted(s string) string {
	s = strings.ReplaceAll(s, "\x00", "")
	s = strings.ReplaceAll(s, "\r", "")
	var b strings.Builder
	for _, l := range strings.SplitAfter(s, "\n") {
		l = strings.TrimSuffix(l, "\n")
		if len(l) > 1998 {
			l = l[:1998]
		}
		b.WriteString(l)
		if b.Len() > 0 {
			b.WriteString("\r\n")
		}
	}
	return b.String()
}

var statusField = regexp.MustCompile(`^([245])\.[0-9]{1,3}\.[0-9]{1,3}$`)

func checkDSN(t *testing.T, body []byte, full bool, m *message, r dsnRecipient, original string) {
	t.Helper()
	fail := func(format string, args ...any) {
		t.Helper()
		t.Fatalf(format+"\nDSN:\n%s", append(args, body)...)
	}
	if i := bytes.IndexFunc(body, func(r rune) bool { return r == '\n' }); i >= 0 {
		for k := range body {
			if body[k] == '\n' && (k == 0 || body[k-1] != '\r') {
				fail("bare LF at byte %d", k)
			}
			if body[k] == '\r' && (k+1 == len(body) || body[k+1] != '\n') {
				fail("bare CR at byte %d", k)
			}
		}
	}
	validIn := utf8.ValidString(m.Envelope.From + r.Addr + r.ORcpt + r.Last.Enhanced + r.Last.Text + r.LastMX + m.Envelope.EnvID)

	msg, err := mail.ReadMessage(bytes.NewReader(body))
	if err != nil {
		fail("not a message: %v", err)
	}
	want := []string{"From", "To", "Subject", "Date", "Message-Id", "Auto-Submitted", "Mime-Version", "Content-Type"}
	// RFC 2045 §6.4: an 8-bit multipart says so.
	if eight := !asciiBytes(body[bytes.Index(body, []byte("\r\n\r\n")):]); eight != (msg.Header.Get("Content-Transfer-Encoding") == "8bit") {
		fail("8-bit body %v, Content-Transfer-Encoding %q", eight, msg.Header["Content-Transfer-Encoding"])
	} else if eight {
		want = append(want, "Content-Transfer-Encoding")
	}
	if len(msg.Header) != len(want) {
		fail("header fields %v, want exactly %v", keys(msg.Header), want)
	}
	for _, k := range want {
		if len(msg.Header[k]) != 1 {
			fail("header %s appears %d times", k, len(msg.Header[k]))
		}
	}
	if _, err := msg.Header.Date(); err != nil {
		fail("Date: %v", err)
	}
	mt, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/report" || params["report-type"] != "delivery-status" || params["boundary"] == "" {
		fail("Content-Type %q", msg.Header.Get("Content-Type"))
	}

	// Our own lines (all but the attached original) are short and, from
	// valid input, valid UTF-8.
	// RFC 6533: UTF-8 in the message or the report makes the parts global.
	global := bytes.Contains(body, []byte("Content-Type: message/global-delivery-status"))
	third := map[[2]bool]string{{false, false}: "text/rfc822-headers", {false, true}: "message/rfc822",
		{true, false}: "message/global-headers", {true, true}: "message/global"}[[2]bool{global, full}]
	status := "message/delivery-status"
	if global {
		status = "message/global-delivery-status"
	}
	end := bytes.Index(body, []byte("Content-Type: "+third))
	if end < 0 {
		fail("no third part")
	}
	for _, l := range strings.Split(string(body[:end]), "\r\n") {
		if len(l) > 998 {
			fail("line of %d characters (RFC 5322 §2.1.1): %.80q…", len(l), l)
		}
	}
	if validIn && !utf8.Valid(body[:end]) {
		fail("invalid UTF-8 made from valid input")
	}

	mr := multipart.NewReader(msg.Body, params["boundary"])
	var parts [][]byte
	var types []string
	for {
		p, err := mr.NextRawPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			fail("part %d: %v", len(parts)+1, err)
		}
		b, err := io.ReadAll(p)
		if err != nil {
			fail("part %d: %v", len(parts)+1, err)
		}
		parts = append(parts, b)
		types = append(types, p.Header.Get("Content-Type"))
	}
	if len(parts) != 3 || !strings.HasPrefix(types[0], "text/plain") || types[1] != status || types[2] != third {
		fail("parts %v, want text/plain, %s, %s", types, status, third)
	}
	wantOriginal := string(headerSection([]byte(original)))
	if full {
		wantOriginal = original
	}
	if string(parts[2]) != wantOriginal {
		fail("third part %q, want the original's %q", parts[2], wantOriginal)
	}

	// message/delivery-status: the per-message block, then one per recipient.
	tr := textproto.NewReader(bufio.NewReader(bytes.NewReader(parts[1])))
	var blocks []textproto.MIMEHeader
	for {
		h, err := tr.ReadMIMEHeader()
		if len(h) > 0 {
			blocks = append(blocks, h)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			fail("delivery-status block %d: %v", len(blocks)+1, err)
		}
	}
	if len(blocks) != 3 {
		fail("%d delivery-status blocks, want 1 + 2 recipients", len(blocks))
	}
	if got := blocks[0].Get("Reporting-Mta"); got != "dns; relay.test" {
		fail("Reporting-MTA %q", got)
	}
	if _, ok := blocks[0]["Original-Envelope-Id"]; ok != (m.Envelope.EnvID != "") {
		fail("Original-Envelope-Id present = %v with ENVID %q", ok, m.Envelope.EnvID)
	}
	class := map[string]string{"failed": "5", "delayed": "4", "delivered": "2", "relayed": "2"}[r.Action]
	for _, b := range blocks[1:] {
		if len(b["Action"]) != 1 || b.Get("Action") != r.Action {
			fail("Action %q, want %q", b["Action"], r.Action)
		}
		addrType := "rfc822;"
		if !isASCII(r.Addr) {
			addrType = "utf-8;" // RFC 6533 §3
		}
		if len(b["Final-Recipient"]) != 1 || !strings.HasPrefix(b.Get("Final-Recipient"), addrType) {
			fail("Final-Recipient %q", b["Final-Recipient"])
		}
		st := statusField.FindStringSubmatch(b.Get("Status"))
		if len(b["Status"]) != 1 || st == nil || st[1] != class {
			fail("Status %q for action %s", b["Status"], r.Action)
		}
		if _, ok := b["Diagnostic-Code"]; ok != (r.Last.Code != 0) {
			fail("Diagnostic-Code present = %v with reply code %d", ok, r.Last.Code)
		}
		if _, ok := b["Will-Retry-Until"]; ok != (r.Action == "delayed") {
			fail("Will-Retry-Until present = %v for action %s", ok, r.Action)
		}
		if _, ok := b["Remote-Mta"]; ok != (r.Last.RemoteMTA != "") {
			fail("Remote-MTA present = %v with the status's remote MTA %q", ok, r.Last.RemoteMTA)
		}
	}
}

func keys(h mail.Header) []string {
	var out []string
	for k := range h {
		out = append(out, k)
	}
	return out
}

func TestDSNStatusIsAWellFormedCodeOfItsClass(t *testing.T) {
	for _, tc := range []struct {
		action, enhanced, want string
	}{
		{"failed", "5.1.1", "5.1.1"},
		{"failed", "4.4.1", "5.0.0"},
		{"failed", "5.", "5.0.0"},
		{"failed", "5.1.1 user unknown", "5.0.0"},
		{"delayed", "4.4.1000", "4.0.0"},
		{"delayed", "4.7.10", "4.7.10"},
		{"delivered", "2.0.0", "2.0.0"},
		{"relayed", "", "2.0.0"},
	} {
		if got := statusCode(tc.action, Status{Enhanced: tc.enhanced}); got != tc.want {
			t.Errorf("statusCode(%s, %q) = %q, want %q", tc.action, tc.enhanced, got, tc.want)
		}
	}
}

func TestDSNHeaderCutStaysValidUTF8(t *testing.T) {
	from := "a" + strings.Repeat("é", 600) + "@example.com"
	if got := oneLine(from); !utf8.ValidString(got) {
		t.Fatalf("oneLine cut a character in two: %q", got[len(got)-8:])
	}
}
