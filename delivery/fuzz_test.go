package delivery

import (
	"strings"
	"testing"
	"unicode/utf8"
)

// FuzzReplyStatus feeds arbitrary remote replies to the code that turns
// them into queue statuses: no panic, a bounded single line, valid UTF-8.
func FuzzReplyStatus(f *testing.F) {
	f.Add(451, "4.7.1 greylisted, try later")
	f.Add(550, "5.1.1 no such user\n5.1.1 really")
	f.Add(250, "")
	f.Add(421, "\x00\xff\r\n4.")
	f.Fuzz(func(t *testing.T, code int, msg string) {
		for _, st := range []statusT{replyStatus("mx[192.0.2.1]", code, msg), failureStatus("mx[192.0.2.1]", code, msg)} {
			if strings.ContainsAny(st.Text, "\r\n") || !utf8.ValidString(st.Text) || len(st.Text) > maxTextLen+len(ellipsis) {
				t.Errorf("status text %q is not one short line of UTF-8", st.Text)
			}
		}
		if got, want := replyStatus("mx[192.0.2.1]", code, msg), fmtReplyStatus("mx[192.0.2.1]", code, msg); got != want {
			t.Errorf("replyStatus(%d, %q) = %+v, want %+v as fmt makes it", code, msg, got, want)
		}
		if st := failureStatus("mx", code, msg); st.Code < 400 || st.Code > 599 {
			t.Errorf("failureStatus(%d) = %d, want a 4xx or 5xx", code, st.Code)
		}
	})
}
