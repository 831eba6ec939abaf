package sts

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"golang.org/x/net/idna"
)

// Mode is a policy's mode (RFC 8461 §5).
type Mode string

const (
	// ModeEnforce: deliver only to MX hosts that match the policy and
	// present a valid certificate over TLS.
	ModeEnforce Mode = "enforce"
	// ModeTesting: verify and report, but deliver as without a policy.
	ModeTesting Mode = "testing"
	// ModeNone: the domain has no active policy (RFC 8461 §8.3 uses it to
	// withdraw one).
	ModeNone Mode = "none"
)

// MaxMaxAge is the largest max_age a policy may give, one year of 365.25
// days (RFC 8461 §3.2).
const MaxMaxAge = 31557600 * time.Second

// Policy is a parsed policy file (RFC 8461 §3.2).
type Policy struct {
	Version string // always "STSv1"
	Mode    Mode
	// MX holds the patterns as lower-case A-labels without a trailing dot:
	// "mx.example.com" or "*.example.net".
	MX     []string
	MaxAge time.Duration
}

// PolicyError is a policy file that does not follow RFC 8461 §3.2. A policy
// with such an error is invalid as a whole.
type PolicyError struct {
	Line int // 1-based; 0 when the error is about the whole policy
	Msg  string
}

func (e *PolicyError) Error() string {
	if e.Line == 0 {
		return "invalid MTA-STS policy: " + e.Msg
	}
	return fmt.Sprintf("invalid MTA-STS policy: line %d: %s", e.Line, e.Msg)
}

// Parse parses a policy file. Keys are case-sensitive, unknown keys are
// ignored, the first of a repeated non-mx key wins, and any missing or
// malformed required field makes the whole policy invalid (RFC 8461 §3.2).
//
// A max_age above MaxMaxAge is syntactically valid (1*10DIGIT) but exceeds
// what §3.2 allows; Parse caps it at MaxMaxAge instead of rejecting the
// policy, because rejecting would discard a policy whose owner asked for
// more protection, not less, and leave the domain unprotected.
//
// Blank lines, empty or of spaces and tabs only, are tolerated (many
// published policies end in one), though the ABNF allows neither. A field
// must still start its line: RFC 8461 §3.2 dropped leading *WSP, which
// RFC 5322 parsers would take for a folded line.
func Parse(body []byte) (*Policy, error) {
	p := &Policy{}
	seen := map[string]bool{}
	// RFC 8461 §3.2: sts-policy-term = LF / CRLF.
	lines := strings.Split(string(body), "\n")
	for i, line := range lines {
		n := i + 1
		line = strings.TrimSuffix(line, "\r")
		if strings.Trim(line, " \t") == "" {
			continue
		}
		// RFC 8461 §3.2: field ":" *WSP value, trailing *WSP allowed.
		key, value, ok := strings.Cut(line, ":")
		if !ok {
			return nil, &PolicyError{n, fmt.Sprintf("%q is not a key: value line", truncate(line))}
		}
		if !validFieldName(key) {
			return nil, &PolicyError{n, fmt.Sprintf("%q is not a valid field name", truncate(key))}
		}
		value = strings.Trim(value, " \t")
		if !validFieldValue(value) {
			return nil, &PolicyError{n, fmt.Sprintf("field %s: value %q has control characters or is empty", key, truncate(value))}
		}
		if key != "mx" {
			// Repeated non-mx keys: the first one wins; the RFC does
			// not say, and first-wins is what most parsers do.
			if seen[key] {
				continue
			}
			seen[key] = true
		}
		switch key {
		case "version":
			// RFC 8461 §3.2: only "STSv1" is defined, case-sensitive.
			if value != "STSv1" {
				return nil, &PolicyError{n, fmt.Sprintf("version %q, want STSv1", truncate(value))}
			}
			p.Version = value
		case "mode":
			switch Mode(value) {
			case ModeEnforce, ModeTesting, ModeNone:
				p.Mode = Mode(value)
			default:
				return nil, &PolicyError{n, fmt.Sprintf("mode %q, want enforce, testing or none", truncate(value))}
			}
		case "max_age":
			// RFC 8461 §3.2: sts-policy-max-age-value = 1*10(DIGIT).
			if len(value) > 10 || !allDigits(value) {
				return nil, &PolicyError{n, fmt.Sprintf("max_age %q is not 1 to 10 digits", truncate(value))}
			}
			secs, _ := strconv.ParseInt(value, 10, 64) // 10 digits always fit
			// Compare in seconds: ten digits of seconds overflow a Duration.
			p.MaxAge = time.Duration(min(secs, int64(MaxMaxAge/time.Second))) * time.Second
		case "mx":
			pattern, err := parsePattern(value)
			if err != nil {
				return nil, &PolicyError{n, err.Error()}
			}
			p.MX = append(p.MX, pattern)
		default:
			// RFC 8461 §3.2: unknown fields are ignored.
		}
	}
	switch {
	case p.Version == "":
		return nil, &PolicyError{0, "no version field"}
	case p.Mode == "":
		return nil, &PolicyError{0, "no mode field"}
	case !seen["max_age"]:
		return nil, &PolicyError{0, "no max_age field"}
	case len(p.MX) == 0 && p.Mode != ModeNone:
		// RFC 8461 §3.2: mx is required unless the mode is none.
		return nil, &PolicyError{0, "no mx field in a policy of mode " + string(p.Mode)}
	}
	return p, nil
}

// String renders the policy as a policy file, "key: value" per line, as
// TLSRPT's policy-string wants it (RFC 8460 §4.4).
func (p *Policy) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "version: %s\nmode: %s\n", p.Version, p.Mode)
	for _, mx := range p.MX {
		fmt.Fprintf(&b, "mx: %s\n", mx)
	}
	fmt.Fprintf(&b, "max_age: %d\n", int64(p.MaxAge/time.Second))
	return b.String()
}

// Lines is the policy as TLSRPT's policy-string array (RFC 8460 §4.4).
func (p *Policy) Lines() []string {
	return strings.Split(strings.TrimSuffix(p.String(), "\n"), "\n")
}

// Match reports whether host (an MX host name, any case, with or without a
// trailing dot, U-labels allowed) matches one of the policy's mx patterns.
// A "*." pattern matches exactly one left-most label (RFC 8461 §4.1, which
// points to RFC 6125 §6.4.3): "*.example.com" matches "mx.example.com" but
// neither "example.com" nor "a.mx.example.com".
func (p *Policy) Match(host string) bool {
	h, err := normalizeHost(host)
	if err != nil {
		return false
	}
	for _, pattern := range p.MX {
		if matchPattern(pattern, h) {
			return true
		}
	}
	return false
}

// matchPattern matches a normalised pattern against a normalised host.
func matchPattern(pattern, host string) bool {
	if suffix, ok := strings.CutPrefix(pattern, "*."); ok {
		first, rest, ok := strings.Cut(host, ".")
		return ok && first != "" && rest == suffix
	}
	return pattern == host
}

// parsePattern checks an mx value, sts-policy-mx-value = ["*."] Domain, and
// returns it normalised. U-labels are accepted and turned into A-labels.
func parsePattern(v string) (string, error) {
	wildcard := strings.HasPrefix(v, "*.")
	name := strings.TrimPrefix(v, "*.")
	h, err := normalizeHost(name)
	if err != nil {
		return "", fmt.Errorf("mx %q: %v", truncate(v), err)
	}
	if wildcard {
		return "*." + h, nil
	}
	return h, nil
}

var errBadName = errors.New("not a valid domain name")

// normalizeHost returns name as lower-case A-labels without a trailing dot,
// checked against RFC 5321's Domain syntax.
func normalizeHost(name string) (string, error) {
	name = strings.TrimSuffix(name, ".")
	if name == "" || len(name) > 253 {
		return "", errBadName
	}
	for i := 0; i < len(name); i++ {
		if name[i] >= 0x80 {
			a, err := idna.Lookup.ToASCII(name)
			if err != nil {
				return "", fmt.Errorf("%w: %v", errBadName, err)
			}
			name = a
			break
		}
	}
	name = strings.ToLower(name)
	for label := range strings.SplitSeq(name, ".") {
		if !validLabel(label) {
			return "", errBadName
		}
	}
	return name, nil
}

// validLabel checks an RFC 5321 sub-domain: Let-dig [Ldh-str].
func validLabel(l string) bool {
	if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
		return false
	}
	for i := 0; i < len(l); i++ {
		c := l[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// validFieldName checks sts-policy-ext-name, which covers the defined keys:
// (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".").
func validFieldName(k string) bool {
	if k == "" || len(k) > 32 || !isAlnum(k[0]) {
		return false
	}
	for i := 1; i < len(k); i++ {
		if c := k[i]; !isAlnum(c) && c != '_' && c != '-' && c != '.' {
			return false
		}
	}
	return true
}

// validFieldValue checks sts-policy-ext-value: VCHAR, SP and UTF-8, not
// empty (the trimming already removed leading and trailing blanks).
func validFieldValue(v string) bool {
	if v == "" {
		return false
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; c < 0x20 || c == 0x7f {
			return false
		}
	}
	return true
}

func isAlnum(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

func allDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// truncate keeps error messages about hostile input short, never cutting
// a UTF-8 character in half.
func truncate(s string) string {
	if len(s) <= 64 {
		return s
	}
	n := 64
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "..." // ASCII: it ends up in statuses and DSNs
}
