package smtpin

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"unicode/utf8"
)

// errNeedsSMTPUTF8 is a non-ASCII address in a transaction without the
// SMTPUTF8 parameter; RFC 6531 §3.5 has its own reply for it.
var errNeedsSMTPUTF8 = errors.New("non-ASCII address needs the SMTPUTF8 parameter")

// parseMailbox checks a mailbox that go-smtp has taken out of MAIL or
// RCPT and returns it in the form to send on. go-smtp removes the quotes
// of a quoted local part, so one that is not a dot-string is quoted again.
func parseMailbox(addr string, smtputf8 bool) (string, error) {
	// A domain never holds an '@', so the last one ends the local part:
	// <"a@b"@example.org> is valid (RFC 5321 §4.1.2), and go-smtp hands
	// it over as a@b@example.org (it refuses the unquoted <a@b@example.org>).
	// An '@' that begins or ends the local part is taken for the typo it
	// almost always is.
	i := strings.LastIndexByte(addr, '@')
	if i < 0 {
		return "", errors.New("no @domain")
	}
	local, domain := addr[:i], addr[i+1:]
	if strings.HasPrefix(local, "@") || strings.HasSuffix(local, "@") {
		return "", errors.New("'@' not allowed at the start or end of the local part")
	}
	if !utf8.ValidString(addr) {
		return "", errors.New("not valid UTF-8")
	}
	ascii := true
	for _, r := range addr {
		if r >= 0x80 {
			ascii = false
		}
		if r < 0x20 || r == 0x7f {
			return "", errors.New("control character")
		}
	}
	if !ascii && !smtputf8 {
		return "", errNeedsSMTPUTF8
	}
	// RFC 5321 §4.5.3.1.1 and §4.5.3.1.2.
	if local == "" {
		return "", errors.New("empty local part")
	}
	if len(local) > 64 {
		return "", errors.New("local part longer than 64 octets")
	}
	if err := checkDomain(domain); err != nil {
		return "", err
	}
	out := addr // local@domain, as it came: no new string per address
	if !isDotString(local) {
		out = quoteLocal(local) + "@" + domain
	}
	if len(out) > 254 { // RFC 5321 §4.5.3.1.3: 256 for the path, with < >
		return "", errors.New("address longer than 254 octets")
	}
	return out, nil
}

// checkDomain accepts a host name (A-labels or, with SMTPUTF8, U-labels)
// or an address literal (RFC 5321 §4.1.3).
func checkDomain(d string) error {
	if d == "" {
		return errors.New("empty domain")
	}
	if len(d) > 253 {
		return errors.New("domain longer than 253 octets")
	}
	if strings.HasPrefix(d, "[") {
		lit, ok := strings.CutSuffix(d[1:], "]")
		if !ok {
			return errors.New("unclosed address literal")
		}
		// RFC 5321 §4.1.3 with RFC 5234 §2.3: the tag is case-insensitive;
		// the literal is passed on as written.
		if len(lit) >= 5 && strings.EqualFold(lit[:5], "IPv6:") {
			if a, err := netip.ParseAddr(lit[5:]); err != nil || !a.Is6() || a.Zone() != "" {
				return fmt.Errorf("bad IPv6 address literal %q", lit)
			}
			return nil
		}
		if a, err := netip.ParseAddr(lit); err != nil || !a.Is4() {
			return fmt.Errorf("bad address literal %q", lit)
		}
		return nil
	}
	for label := range strings.SplitSeq(d, ".") { // no slice: runs per RCPT
		if label == "" {
			return fmt.Errorf("empty label in domain %q", d)
		}
		if len(label) > 63 {
			return fmt.Errorf("label longer than 63 octets in domain %q", d)
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("label starts or ends with '-' in domain %q", d)
		}
		for _, r := range label {
			ok := r >= 0x80 || r == '-' || r == '_' ||
				'a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9'
			if !ok {
				return fmt.Errorf("character %q not allowed in domain %q", r, d)
			}
		}
	}
	return nil
}

// isDotString reports whether s is an RFC 5321 Dot-string (UTF-8 counts
// as atext, RFC 6531 §3.3): atoms of atext joined by single dots.
func isDotString(s string) bool {
	atom := 0 // length of the atom so far
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '.':
			if atom == 0 {
				return false
			}
			atom = 0
		case c >= 0x80 || atext[c]:
			atom++
		default:
			return false
		}
	}
	return atom > 0
}

// atext marks the ASCII characters of RFC 5322 §3.2.3 atext.
var atext = func() (t [128]bool) {
	for c := 'a'; c <= 'z'; c++ {
		t[c], t[c-'a'+'A'] = true, true
	}
	for c := '0'; c <= '9'; c++ {
		t[c] = true
	}
	for _, c := range "!#$%&'*+-/=?^_`{|}~" {
		t[c] = true
	}
	return t
}()

// quoteLocal makes an RFC 5321 Quoted-string.
func quoteLocal(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for _, r := range s {
		if r == '"' || r == '\\' {
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	b.WriteByte('"')
	return b.String()
}
