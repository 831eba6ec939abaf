package main

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"unicode/utf8"
)

// say is fmt.Fprintf for what the commands print. Its arguments are often
// what the network sent (certificate names, greetings, replies, DNS names,
// errors that quote them): each is escaped, so that none can drive the
// reader's terminal or break a line of the output.
func say(w io.Writer, format string, args ...any) {
	for i, a := range args {
		switch v := a.(type) {
		case string:
			args[i] = printable(v)
		case error:
			args[i] = printable(v.Error())
		case fmt.Stringer:
			args[i] = printable(v.String())
		}
	}
	fmt.Fprintf(w, format, args...)
}

// printable writes invalid UTF-8 and every rune Go does not count as
// printable (C0 controls, line ends among them, DEL, C1, bidi overrides)
// as Go escapes: a certificate's SAN may hold ESC and BEL, and a greeting
// or reply the C1 CSI, which delivery's own cleaning keeps.
func printable(s string) string {
	var b strings.Builder
	for len(s) > 0 {
		r, n := utf8.DecodeRuneInString(s)
		switch {
		case r == utf8.RuneError && n == 1:
			fmt.Fprintf(&b, `\x%02x`, s[0])
		case !strconv.IsPrint(r):
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
		default:
			b.WriteString(s[:n])
		}
		s = s[n:]
	}
	return b.String()
}
