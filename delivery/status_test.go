package delivery

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
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
	return statusT{Code: code, Enhanced: enh, RemoteMTA: hostOf(label),
		Reply: truncate(fmt.Sprintf("%d %s", code, fmtOneLine(msg))),
		Text:  truncate(fmt.Sprintf("%s: %d %s %s", label, code, enh, text))}
}

// fmtOneLine is oneLine without its shortcut for text that is already
// one line.
func fmtOneLine(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r == '\n' || r == '\r' || r == '\t':
			b.WriteByte(' ')
		case r < 0x20 || r == 0x7f || r == 0xfffd:
		default:
			b.WriteRune(r)
		}
		if b.Len() > 2*maxTextLen {
			break
		}
	}
	return truncate(strings.Join(strings.Fields(b.String()), " "))
}

func TestReplyStatusKeepsItsWords(t *testing.T) {
	for _, tc := range []struct {
		code int
		msg  string
	}{
		{250, "2.0.0 OK: queued as 4ZK3f21Xyz"},
		{250, "OK"},
		{250, ""},
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
