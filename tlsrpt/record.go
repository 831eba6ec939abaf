package tlsrpt

import (
	"context"
	"errors"
	"fmt"
	"net/mail"
	"net/url"
	"strings"

	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/resolve"
)

var (
	// ErrNoRecord means no TXT record at _smtp._tls.<domain> begins with
	// v=TLSRPTv1: the domain does not want reports.
	ErrNoRecord = errors.New("no TLSRPT TXT record")
	// ErrMultipleRecords means more than one such record: RFC 8460 §3 says
	// the domain then does not implement TLSRPT.
	ErrMultipleRecords = errors.New("more than one TLSRPT TXT record")
)

// RecordError is a v=TLSRPTv1 record that does not follow RFC 8460 §3; the
// domain is treated as not wanting reports.
type RecordError struct {
	Text string // the record, truncated
	Msg  string
}

func (e *RecordError) Error() string {
	return fmt.Sprintf("invalid TLSRPT TXT record %q: %s", e.Text, e.Msg)
}

// Record is a parsed _smtp._tls TXT record (RFC 8460 §3).
type Record struct {
	// RUA are the rua URIs in the order published, each parsed; one whose
	// scheme is neither mailto nor https has Err set and is not used.
	RUA []Endpoint
	// Extensions are the other fields, ignored (RFC 8460 §3) but kept for
	// display.
	Extensions []string
}

// Endpoint is one rua URI.
type Endpoint struct {
	URI string // as published
	// Mailbox is the address of a mailto: URI.
	Mailbox string
	// URL is an https: URI.
	URL string
	// Err says why the URI cannot be used.
	Err error
}

// Usable lists the endpoints that can be sent to.
func (r *Record) Usable() []Endpoint {
	var out []Endpoint
	for _, e := range r.RUA {
		if e.Err == nil {
			out = append(out, e)
		}
	}
	return out
}

// IsRecord reports whether txt is a TLSRPT record at all: RFC 8460 §3 says
// records that do not begin with "v=TLSRPTv1;" are discarded. A record of
// just the version, or with a blank before ";", counts (and fails to parse).
func IsRecord(txt string) bool {
	rest, ok := strings.CutPrefix(txt, "v=TLSRPTv1")
	return ok && (rest == "" || rest[0] == ';' || rest[0] == ' ' || rest[0] == '\t')
}

// ParseRecord parses one TXT record, its strings already concatenated
// (RFC 8460 §3):
//
//	tlsrpt-record = tlsrpt-version 1*(field-delim tlsrpt-field) [field-delim]
//	field-delim   = *WSP ";" *WSP
//	tlsrpt-rua    = %s"rua=" tlsrpt-uri *(*WSP "," *WSP tlsrpt-uri)
//
// rua is required and may appear once. A URI that is valid but neither
// mailto: nor https: leaves the record valid; that URI is not used.
func ParseRecord(txt string) (*Record, error) {
	bad := func(format string, args ...any) error {
		return &RecordError{Text: truncate(txt, 100), Msg: fmt.Sprintf(format, args...)}
	}
	fields := strings.Split(txt, ";")
	if len(fields) > 1 && strings.Trim(fields[len(fields)-1], " \t") == "" {
		fields = fields[:len(fields)-1] // a trailing delimiter is allowed
	}
	if strings.TrimRight(fields[0], " \t") != "v=TLSRPTv1" {
		return nil, bad("does not begin with v=TLSRPTv1")
	}
	r := &Record{}
	seenRUA := false
	for _, f := range fields[1:] {
		f = strings.Trim(f, " \t")
		key, value, ok := strings.Cut(f, "=")
		if !ok || !validExtName(key) {
			return nil, bad("field %q is not key=value", truncate(f, 40))
		}
		if key != "rua" {
			// tlsrpt-ext-value = 1*(%x21-3A / %x3C / %x3E-7E)
			if !validExtValue(value) {
				return nil, bad("field %s has an invalid value", key)
			}
			r.Extensions = append(r.Extensions, f)
			continue
		}
		if seenRUA {
			return nil, bad("more than one rua field")
		}
		seenRUA = true
		for _, u := range strings.Split(value, ",") {
			u = strings.Trim(u, " \t")
			if u == "" {
				return nil, bad("empty URI in rua")
			}
			ep, err := parseURI(u)
			if err != nil {
				return nil, bad("rua %q: %v", truncate(u, 60), err)
			}
			r.RUA = append(r.RUA, ep)
		}
	}
	if !seenRUA {
		return nil, bad("no rua field")
	}
	return r, nil
}

// parseURI checks one rua URI. Syntax errors fail the record; an unknown
// scheme only marks the endpoint unusable.
func parseURI(s string) (Endpoint, error) {
	ep := Endpoint{URI: s}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c >= 0x7f || c == '"' || c == '<' || c == '>' || c == '\\' {
			return ep, errors.New("not a URI")
		}
	}
	u, err := url.Parse(s)
	if err != nil || u.Scheme == "" {
		return ep, errors.New("not a URI")
	}
	switch strings.ToLower(u.Scheme) {
	case "mailto":
		// RFC 6068: mailto:addr-spec[?hfields]; the hfields are ignored.
		raw := u.Opaque
		if raw == "" {
			raw = u.Path
		}
		addr, err := url.PathUnescape(raw)
		if err != nil || !validMailbox(addr) {
			ep.Err = fmt.Errorf("mailto address %q is not an email address", truncate(raw, 60))
			return ep, nil
		}
		// The queue's own check: an address it refuses would fail the one
		// message that carries the report to every mailto: endpoint.
		domain, err := queue.RecipientDomain(addr)
		if err != nil {
			ep.Err = fmt.Errorf("mailto address %q: domain is not a host name", truncate(raw, 60))
			return ep, nil
		}
		// The A-label, so that the report needs no SMTPUTF8 for the domain.
		ep.Mailbox = addr[:strings.LastIndexByte(addr, '@')+1] + domain
	case "https":
		if u.Host == "" || u.User != nil {
			ep.Err = errors.New("https URI without a host, or with credentials")
			return ep, nil
		}
		ep.URL = u.String()
	default:
		ep.Err = fmt.Errorf("scheme %s: only mailto and https are supported (RFC 8460 §3)", u.Scheme)
	}
	return ep, nil
}

// validMailbox accepts a bare addr-spec with a dotted domain.
func validMailbox(s string) bool {
	a, err := mail.ParseAddress(s)
	if err != nil || a.Name != "" || a.Address != s {
		return false
	}
	at := strings.LastIndexByte(s, '@')
	return at > 0 && strings.Contains(s[at+1:], ".")
}

// tlsrpt-ext-name = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
func validExtName(s string) bool {
	if s == "" || len(s) > 32 || !isAlnum(s[0]) {
		return false
	}
	for i := 1; i < len(s); i++ {
		if c := s[i]; !isAlnum(c) && c != '_' && c != '-' && c != '.' {
			return false
		}
	}
	return true
}

func validExtValue(v string) bool {
	if v == "" {
		return false
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; c < 0x21 || c > 0x7e || c == ';' || c == '=' {
			return false
		}
	}
	return true
}

func isAlnum(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

// LookupRecord finds the TLSRPT record of domain: TXT at _smtp._tls.<domain>,
// CNAMEs followed, strings concatenated. Errors are ErrNoRecord,
// ErrMultipleRecords, a *RecordError, or a DNS error (*resolve.Error) that
// is worth retrying unless resolve.IsNotFound.
func LookupRecord(ctx context.Context, r *resolve.Resolver, domain string) (*Record, error) {
	name := "_smtp._tls." + strings.TrimSuffix(domain, ".") + "."
	txts, _, err := r.TXT(ctx, name)
	if err != nil {
		if resolve.IsNotFound(err) {
			return nil, ErrNoRecord
		}
		return nil, err
	}
	var found []string
	for _, t := range txts {
		if IsRecord(t) {
			found = append(found, t)
		}
	}
	switch len(found) {
	case 0:
		return nil, ErrNoRecord
	case 1:
		return ParseRecord(found[0])
	}
	return nil, ErrMultipleRecords
}

// isNoRecord reports whether err says the domain wants no reports, as
// opposed to a DNS failure that may pass.
func isNoRecord(err error) bool {
	var re *RecordError
	return errors.Is(err, ErrNoRecord) || errors.Is(err, ErrMultipleRecords) || errors.As(err, &re)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
