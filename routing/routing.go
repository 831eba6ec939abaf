// Package routing is the one matcher behind every per-destination table of
// the configuration ([[delivery.route]], [[delivery.policy]],
// [[delivery.limits]]): domain patterns (exact, ".subdomain", "*") and
// sender patterns, the most specific match winning, as Postfix's transport
// and sender-dependent maps read. It also parses next hops as Postfix
// writes them ("[host]:port" without an MX lookup, "name:port" with one).
// It does no I/O.
package routing

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"unicode/utf8"

	"golang.org/x/net/idna"
)

// Pattern matches recipient domains (or host names): "example.org" that
// name alone, ".example.org" every name below it (not example.org
// itself), "*" every name.
type Pattern struct {
	kind patternKind
	name string // lower case, no trailing dot; for subdomains without the leading dot
}

type patternKind uint8

const (
	patternAny patternKind = iota
	patternSubdomains
	patternExact
)

// ParsePattern parses one domain pattern. A name in U-labels is kept in
// A-labels, the form recipient domains are matched in.
func ParsePattern(s string) (Pattern, error) {
	t := strings.TrimSuffix(strings.TrimSpace(s), ".")
	if t == "*" {
		return Pattern{kind: patternAny}, nil
	}
	kind := patternExact
	if rest, ok := strings.CutPrefix(t, "."); ok {
		kind, t = patternSubdomains, rest
	}
	if t = ALabels(t); !IsDomain(t) {
		return Pattern{}, fmt.Errorf("%q is not a domain pattern (use example.org, .example.org or *)", s)
	}
	return Pattern{kind: kind, name: t}, nil
}

// Match reports whether name (any case, trailing dot allowed) matches.
func (p Pattern) Match(name string) bool {
	n := strings.TrimSuffix(strings.ToLower(name), ".")
	switch p.kind {
	case patternAny:
		return true
	case patternSubdomains:
		return strings.HasSuffix(n, "."+p.name)
	}
	return n == p.name
}

// rank orders matching patterns: an exact name beats any subdomain
// pattern, a longer suffix beats a shorter one, and "*" comes last. Two
// different patterns matching the same name never share a rank.
func (p Pattern) rank() int {
	switch p.kind {
	case patternSubdomains:
		return 1 + strings.Count(p.name, ".") + 1
	case patternExact:
		return 1000
	}
	return 0
}

func (p Pattern) String() string {
	switch p.kind {
	case patternAny:
		return "*"
	case patternSubdomains:
		return "." + p.name
	}
	return p.name
}

// SenderPattern matches envelope senders: "user@example.org" that address
// (case-insensitively), "@example.org" every sender at that domain, "<>"
// the null sender of bounces.
type SenderPattern struct {
	addr   string // lower case: "user@example.org", "@example.org" or "<>"
	domain bool
}

// ParseSender parses one sender pattern.
func ParseSender(s string) (SenderPattern, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	if t == "<>" {
		return SenderPattern{addr: t}, nil
	}
	local, domain, ok := strings.Cut(t, "@")
	if ok {
		// A domain in U-labels is kept as A-labels, as Match reads
		// senders; ALabels also drops a final dot, which senders lack.
		domain = ALabels(domain)
	}
	if !ok || strings.Contains(domain, "@") || !IsDomain(domain) || strings.ContainsAny(local, " <>") {
		return SenderPattern{}, fmt.Errorf("%q is not a sender pattern (use user@example.org, @example.org or <>)", s)
	}
	return SenderPattern{addr: local + "@" + domain, domain: local == ""}, nil
}

// Match reports whether the envelope sender ("" for <>) matches. An
// SMTPUTF8 sender's domain in U-labels matches a pattern in A-labels.
func (p SenderPattern) Match(sender string) bool {
	s := strings.ToLower(sender)
	if at := strings.LastIndexByte(sender, '@'); at >= 0 && !isASCII(sender[at+1:]) {
		s = strings.ToLower(sender[:at]) + "@" + ALabels(sender[at+1:])
	}
	switch {
	case p.addr == "<>":
		return s == ""
	case p.domain:
		return s != "" && strings.HasSuffix(s, p.addr)
	}
	return s == p.addr
}

// rank: an address beats a domain; no sender pattern at all ranks 0.
func (p SenderPattern) rank() int {
	if p.domain {
		return 1
	}
	return 2
}

func (p SenderPattern) String() string { return p.addr }

// Entry is one table row: the value applies to a destination matching one
// of Domains, sent by a sender matching one of Senders (none: any sender).
type Entry[T any] struct {
	Domains []Pattern
	Senders []SenderPattern
	Value   T
}

// Table holds entries and finds the most specific one that matches.
// The domain decides first: a route for example.org beats a "*" route for
// the sender's account. Among equal domain matches, a sender address beats
// an @domain, which beats an entry without senders.
type Table[T any] struct {
	entries []Entry[T]
}

// ConflictError says two entries match some destination with the same
// specificity, so neither could win.
type ConflictError struct {
	First, Second int    // entry indexes, First < Second
	Domain        string // the shared domain pattern
	Sender        string // the shared sender pattern, "" for none
}

func (e *ConflictError) Error() string {
	if e.Sender != "" {
		return fmt.Sprintf("entries %d and %d both match domain %s and sender %s", e.First, e.Second, e.Domain, e.Sender)
	}
	return fmt.Sprintf("entries %d and %d both match domain %s with no sender condition", e.First, e.Second, e.Domain)
}

// NewTable checks that no two entries tie, and returns the table. An
// entry without Domains never matches.
func NewTable[T any](entries []Entry[T]) (*Table[T], error) {
	type pair struct{ domain, sender string }
	seen := map[pair]int{}
	for i, e := range entries {
		senders := []string{""}
		if len(e.Senders) > 0 {
			senders = senders[:0]
			for _, s := range e.Senders {
				senders = append(senders, s.String())
			}
		}
		for _, d := range e.Domains {
			for _, s := range senders {
				k := pair{d.String(), s}
				if j, dup := seen[k]; dup && j != i {
					return nil, &ConflictError{First: j, Second: i, Domain: k.domain, Sender: k.sender}
				}
				seen[k] = i
			}
		}
	}
	return &Table[T]{entries: entries}, nil
}

// Lookup returns the value of the most specific entry matching domain and
// sender, and its index; ok is false when none matches.
func (t *Table[T]) Lookup(domain, sender string) (v T, index int, ok bool) {
	if t == nil {
		return v, -1, false
	}
	bestD, bestS := -1, -1
	index = -1
	for i, e := range t.entries {
		d := -1
		for _, p := range e.Domains {
			if r := p.rank(); r > d && p.Match(domain) {
				d = r
			}
		}
		if d < 0 {
			continue
		}
		s := 0
		if len(e.Senders) > 0 {
			s = -1
			for _, p := range e.Senders {
				if r := p.rank(); r > s && p.Match(sender) {
					s = r
				}
			}
			if s < 0 {
				continue
			}
		}
		if d > bestD || d == bestD && s > bestS {
			bestD, bestS, index = d, s, i
		}
	}
	if index < 0 {
		return v, -1, false
	}
	return t.entries[index].Value, index, true
}

// Len is the number of entries.
func (t *Table[T]) Len() int {
	if t == nil {
		return 0
	}
	return len(t.entries)
}

// Nexthop is where a route sends mail, as Postfix writes it.
type Nexthop struct {
	// Host is a lower-case host name, or an IP address.
	Host string
	// Port is the TCP port; 25 unless the nexthop gave one.
	Port int
	// MX says Host's MX records are looked up ("name" or "name:port");
	// false for "[host]" and "[host]:port", which go to Host's own
	// addresses.
	MX bool
	// Addr is Host as an address, valid only for "[192.0.2.1]" forms: no
	// DNS at all.
	Addr netip.Addr
}

// ParseNexthop parses "[host]:port", "[host]", "name:port" or "name".
// An IPv6 address goes in brackets, with or without "ipv6:".
func ParseNexthop(s string) (Nexthop, error) {
	bad := func(why string) (Nexthop, error) {
		return Nexthop{}, fmt.Errorf("%q is not a nexthop: %s (use [host]:port, [192.0.2.1]:port, name:port or name)", s, why)
	}
	t := strings.TrimSpace(s)
	n := Nexthop{Port: 25}
	host, rest := t, ""
	if strings.HasPrefix(t, "[") {
		end := strings.IndexByte(t, ']')
		if end < 0 {
			return bad("no closing bracket")
		}
		host, rest = t[1:end], t[end+1:]
	} else {
		n.MX = true
		if i := strings.LastIndexByte(t, ':'); i >= 0 {
			host, rest = t[:i], t[i:]
		}
	}
	if rest != "" {
		p, ok := strings.CutPrefix(rest, ":")
		port, err := strconv.Atoi(p)
		if !ok || err != nil || port < 1 || port > 65535 || p != strconv.Itoa(port) {
			return bad("the port must be 1-65535")
		}
		n.Port = port
	}
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	lit := host
	if len(lit) > 5 && lit[:5] == "ipv6:" {
		lit = lit[5:]
	}
	if a, err := netip.ParseAddr(lit); err == nil {
		if n.MX {
			return bad("an address goes in brackets")
		}
		if a.Zone() != "" {
			return bad("no zone in an address")
		}
		n.Host, n.Addr = a.Unmap().String(), a.Unmap()
		return n, nil
	}
	if !IsDomain(host) {
		return bad("no host name")
	}
	n.Host = host
	return n, nil
}

// String writes n back in the form it was parsed from.
func (n Nexthop) String() string {
	h := n.Host
	if !n.MX {
		h = "[" + h + "]"
	}
	if n.Port == 25 {
		return h
	}
	return h + ":" + strconv.Itoa(n.Port)
}

// ALabels returns domain in lower-case A-labels without a final dot, as
// an IDNA lookup maps it (UTS #46, RFC 5891 §5): "" if it is no IDNA name.
// "Bücher.example" and "xn--bcher-kva.example" are one domain (RFC 5890
// §2.3.2.1). The mapping folds case itself, and differently from
// strings.ToLower: "STRAẞE" is "strasse" to it, "straße" to Go, so every
// comparison of domains that may hold U-labels must go through this one
// function. An ASCII name is only lower-cased, since IDNA lookups refuse
// the underscore, which host names in DNS may hold; but a label that
// claims to be an A-label ("xn--") must be one, decoding to a valid
// U-label (RFC 5890 §2.3.2.1, RFC 5891 §5.4).
func ALabels(domain string) string {
	domain = strings.TrimSuffix(domain, ".")
	if isASCII(domain) {
		domain = strings.ToLower(domain)
		if strings.Contains(domain, "xn--") {
			for l := range strings.SplitSeq(domain, ".") {
				if strings.HasPrefix(l, "xn--") {
					if _, err := idna.Lookup.ToUnicode(l); err != nil || l == "xn--" {
						return ""
					}
				}
			}
		}
		return domain
	}
	if !utf8.ValidString(domain) {
		return "" // the mapping would make U+FFFD of it, a name of its own
	}
	a, err := idna.Lookup.ToASCII(domain)
	if err != nil {
		return ""
	}
	return a
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			return false
		}
	}
	return true
}

// IsDomain is a light syntax check for a host or domain name: letters,
// digits, hyphens, underscores, dots, no empty labels, at most 253 octets
// (RFC 1035 §2.3.4).
func IsDomain(s string) bool {
	s = strings.TrimSuffix(s, ".")
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return false
			}
		}
	}
	return true
}
