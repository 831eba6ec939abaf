package delivery

import (
	"bufio"
	"errors"
	"fmt"
	"net/textproto"
	"strconv"
	"strings"
	"testing"
	"unicode"
)

// fmtReplyStatus is replyStatus as it was written with fmt and
// strings.Split, kept as the reference for the faster one.
func fmtReplyStatus(label string, code int, msg string) statusT {
	enh, text := "", fmtOneLine(msg)
	first, rest, _ := strings.Cut(text, " ")
	parts := strings.Split(first, ".")
	ok := len(parts) == 3 && parts[0] == strconv.Itoa(code/100)
	for _, p := range parts[min(len(parts), 1):] {
		if n, err := strconv.Atoi(p); err != nil || n < 0 || n > 999 {
			ok = false
		}
	}
	if ok {
		enh, text = first, strings.ReplaceAll(rest, " "+first+" ", " ")
	}
	if enh == "" {
		enh = fmt.Sprintf("%d.0.0", code/100)
	}
	// A reply without text (RFC 5321 §4.2) leaves no space at the end.
	return statusT{Code: code, Enhanced: enh, RemoteMTA: hostOf(label),
		Reply: truncate(strings.TrimSuffix(fmt.Sprintf("%d %s", code, fmtOneLine(msg)), " ")),
		Text:  truncate(strings.TrimSuffix(fmt.Sprintf("%s: %d %s %s", label, code, enh, text), " "))}
}

// fmtOneLine is oneLine without its shortcut for text that is already
// one line.
func fmtOneLine(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r == '\n' || r == '\r' || r == '\t':
			b.WriteByte(' ')
		case unicode.IsControl(r) || unicode.Is(unicode.Bidi_Control, r) || r == 0xfffd:
		default:
			b.WriteRune(r)
		}
		if b.Len() > 2*maxTextLen {
			break
		}
	}
	return truncate(strings.Join(strings.Fields(b.String()), " "))
}

// A remote's text reaches the log, queue list and queue show: no control
// character from it may reach an operator's terminal.
func TestOneLineDropsControlCharacters(t *testing.T) {
	for in, want := range map[string]string{
		"4.7.1 \x1b[2Jcleared":             "4.7.1 [2Jcleared",
		"4.7.1 \u009b2Jcsi":                "4.7.1 2Jcsi",
		"4.7.1 \u202eevil\u202c text":      "4.7.1 evil text",
		"4.7.1 bell\x07 and\x00nul\x7fdel": "4.7.1 bell andnuldel",
		"5.7.1 caf\u00e9":                  "5.7.1 caf\u00e9",
	} {
		if got := oneLine(in); got != want {
			t.Errorf("oneLine(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestReplyStatusKeepsItsWords(t *testing.T) {
	for _, tc := range []struct {
		code int
		msg  string
	}{
		{250, "2.0.0 OK: queued as 4ZK3f21Xyz"},
		{250, "OK"},
		{250, ""},
		{250, "2.0.0"},
		{451, "4.7.1 greylisted, try later"},
		{550, "5.1.1 no such user\r\n5.1.1 really 5.1.1 no"},
		{550, "5.1.1 5.1.1 5.1.1 x"},
		{550, "4.1.1 wrong class"},
		{550, "5.1.1.1 too many parts"},
		{550, "5.01.1000 out of range"},
		{550, "5.-0.+1 signs"},
		{550, "5..1 empty"},
		{421, "\x00\xff\r\n4."},
		{421, " leading and  double  spaces "},
		{421, "tab\there"},
		{554, "5.7.1 caf\u00e9 \u00a0nbsp"},
		{1234, "12.3.4 odd code"},
		{-5, "0.0.0 negative"},
		{250, strings.Repeat("x", maxTextLen)},
		{250, strings.Repeat("x", maxTextLen+1)},
		{250, strings.Repeat("ab ", 300)},
	} {
		got, want := replyStatus("mx[192.0.2.1]", tc.code, tc.msg), fmtReplyStatus("mx[192.0.2.1]", tc.code, tc.msg)
		if got != want {
			t.Errorf("replyStatus(%d, %q)\n = %+v\nwant %+v", tc.code, tc.msg, got, want)
		}
		if got, want := oneLine(tc.msg), fmtOneLine(tc.msg); got != want {
			t.Errorf("oneLine(%q) = %q, want %q", tc.msg, got, want)
		}
	}
}

// readReply answers as textproto.Reader.ReadResponse wherever that reads
// a whole reply, and takes a bare code as a reply without text (RFC 5321
// §4.2), also as the last line of a multiline reply. A last line with
// another code ends the reply too, where textproto would read on into
// the next one.
func TestReadReplyMatchesTextprotoAndTakesBareCodes(t *testing.T) {
	reader := func(in string) *textproto.Reader {
		return textproto.NewReader(bufio.NewReader(strings.NewReader(in + "999 next\r\n")))
	}
	for _, in := range []string{
		"250 ok\r\n", "250 \r\n", "250-mx.test\r\n250-\r\n250 SIZE 10\r\n", "550 5.1.1 no such user\r\n",
		"451-4.3.0 one\r\n451 4.3.0 two\r\n", "250-a\r\nstray text\r\n250 b\r\n", "250-a\r\n251-other\r\n250 b\r\n",
		"25\r\n", "abc ok\r\n", "250x\r\n", "",
	} {
		for _, expect := range []int{0, 2, 25, 250} {
			c1, m1, e1 := reader(in).ReadResponse(expect)
			c2, m2, e2 := readReply(reader(in), expect)
			if c1 != c2 || m1 != m2 || fmt.Sprint(e1) != fmt.Sprint(e2) {
				t.Errorf("%q (expect %d): readReply %d %q %v, textproto %d %q %v", in, expect, c2, m2, e2, c1, m1, e1)
			}
		}
	}
	for _, tc := range []struct {
		in, msg string
		code    int
	}{
		{"250\r\n", "", 250},
		{"250\n", "", 250},
		{"250-mx.test\r\n250\r\n", "mx.test\n", 250},
		{"250-\r\n250\r\n", "\n", 250},
		{"550\r\n", "", 550},
		{"250-a\r\n251 other\r\n", "a\nother", 251},
		{"250-a\r\n251-b\r\n252 c\r\n", "a\n251-b\nc", 252},
		{"250-a\r\n251\r\n", "a\n", 251},
	} {
		r := reader(tc.in)
		code, msg, err := readReply(r, 0)
		if code != tc.code || msg != tc.msg || err != nil {
			t.Errorf("%q: %d %q %v, want %d %q", tc.in, code, msg, err, tc.code, tc.msg)
		}
		if next, _ := r.ReadLine(); next != "999 next" {
			t.Errorf("%q: the next reply starts %q", tc.in, next)
		}
	}
	// The last line's code is the one checked against the expected.
	for _, tc := range []struct {
		in     string
		expect int
		fails  bool
	}{
		{"250-a\r\n551 no\r\n", 2, true},
		{"550-a\r\n250 yes\r\n", 2, false},
	} {
		code, msg, err := readReply(reader(tc.in), tc.expect)
		var te *textproto.Error
		if failed := errors.As(err, &te); failed != tc.fails || tc.fails && (te.Code != code || te.Msg != msg) {
			t.Errorf("%q (expect %d): %d %q %v, want an error %v carrying the reply", tc.in, tc.expect, code, msg, err, tc.fails)
		}
	}
}

// A long ASCII reply cut short stays ASCII: the status goes into DSNs,
// where one character of ours outside ASCII would make an ASCII report a
// UTF-8 one.
func TestLongReplyIsCutWithAnASCIIEllipsis(t *testing.T) {
	st := replyStatus("mx.example.org[192.0.2.1]", 550, "5.7.1 "+strings.Repeat("policy text ", 100))
	if !isASCII(st.Text) || !isASCII(st.Reply) || !strings.HasSuffix(st.Reply, ellipsis) || len(st.Reply) > maxTextLen+len(ellipsis) {
		t.Errorf("reply %q (%d bytes), text %q; want both cut short in ASCII", st.Reply, len(st.Reply), st.Text)
	}
}
