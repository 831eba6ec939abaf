// Package resolve is the one DNS client of stsrelay: MX, address, TXT and
// TLSA lookups against the configured (ideally validating) resolver, with
// the DO bit on every query so the AD bit can be trusted (docs/DESIGN.md,
// "DNSSEC comes from a validating resolver"), CNAME chains followed, TCP on
// truncation and a TTL-respecting cache shared by delivery, sts, dane and
// tlsrpt.
package resolve

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

const (
	// maxCNAMEs bounds a CNAME chain; real chains are one or two long.
	maxCNAMEs = 8
	// ednsSize is the UDP payload we advertise (DNS flag day 2020); larger
	// answers come over TCP, whose messages cannot exceed 64 KiB.
	ednsSize = 1232
	// maxTTL caps how long an answer is cached, whatever its TTL says.
	maxTTL = 24 * time.Hour
	// negativeTTL caps the caching of NXDOMAIN and NODATA (RFC 2308 §5).
	negativeTTL = 5 * time.Minute
	// defaultCacheEntries bounds the cache; an outbound relay sees few domains.
	defaultCacheEntries = 10000
)

// Config says which resolver to ask and how patiently.
type Config struct {
	// Servers are host:port addresses; empty means /etc/resolv.conf.
	Servers []string
	// Timeout bounds one query to one server; 0 means DefaultTimeout.
	Timeout time.Duration
	// CacheEntries bounds the cache; 0 means 10000, negative disables it.
	CacheEntries int
}

// DefaultTimeout bounds one query to one server when Config.Timeout is
// 0, and is the default of the dns.timeout key.
const DefaultTimeout = 5 * time.Second

// Resolver sends queries and caches answers. It is safe for concurrent use.
type Resolver struct {
	servers []string
	timeout time.Duration
	udp     *dns.Client
	tcp     *dns.Client

	mu       sync.Mutex
	cache    map[cacheKey]*cacheEntry
	maxCache int
	inflight map[cacheKey]*call
	now      func() time.Time
}

type cacheKey struct {
	name  string
	qtype uint16
}

type cacheEntry struct {
	msg     *dns.Msg
	own     []dns.RR // see ownRecords
	expires time.Time
}

type call struct {
	done chan struct{}
	msg  *dns.Msg
	own  []dns.RR
	err  error
}

// New returns a Resolver for cfg.
func New(cfg Config) (*Resolver, error) {
	servers := cfg.Servers
	if len(servers) == 0 {
		cc, err := dns.ClientConfigFromFile("/etc/resolv.conf")
		if err != nil {
			return nil, fmt.Errorf("dns: reading /etc/resolv.conf: %w", err)
		}
		for _, s := range cc.Servers {
			servers = append(servers, net.JoinHostPort(s, cc.Port))
		}
		if len(servers) == 0 {
			return nil, errors.New("dns: /etc/resolv.conf names no nameserver; set dns.resolver")
		}
	}
	for _, s := range servers {
		if _, _, err := net.SplitHostPort(s); err != nil {
			return nil, fmt.Errorf("dns: resolver %q is not host:port", s)
		}
	}
	timeout := cfg.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	maxCache := cfg.CacheEntries
	if maxCache == 0 {
		maxCache = defaultCacheEntries
	}
	return &Resolver{
		servers:  servers,
		timeout:  timeout,
		udp:      &dns.Client{Net: "udp", Timeout: timeout, UDPSize: ednsSize},
		tcp:      &dns.Client{Net: "tcp", Timeout: timeout},
		cache:    make(map[cacheKey]*cacheEntry),
		maxCache: maxCache,
		inflight: make(map[cacheKey]*call),
		now:      time.Now,
	}, nil
}

// Result is the answer to one lookup after CNAMEs were followed.
type Result struct {
	Name   string   // the name asked for, canonical (lower case, trailing dot)
	CNAMEs []string // aliases followed from Name, in order
	Final  string   // the name the records belong to: Name or the last alias
	// Records are the answer records of the asked type at Final. They are
	// shared with the cache: read them, never modify them.
	Records []dns.RR
	// Secure is true when every response used had the AD bit: the whole
	// chain was validated by the resolver (RFC 4035 §3.2.3).
	Secure bool
	// AliasSigned is true when Name's CNAME came with an RRSIG covering
	// it (queries set DO): Name's zone is signed, even when the chain
	// goes on into an unsigned one and Secure is false. A validating
	// resolver answers SERVFAIL, not an unsigned CNAME, when a signed
	// zone's signature is missing or bogus.
	AliasSigned bool
}

// Error is a failed lookup. NotFound (NXDOMAIN) is permanent; anything
// else (SERVFAIL, REFUSED, timeouts, malformed answers) is temporary.
type Error struct {
	Name     string
	Type     string
	Rcode    int // DNS response code, -1 when there was no response
	NotFound bool
	Err      error
	// At is the CNAME target the response code speaks of, when Name is an
	// alias (RFC 6604 §3: the code is about the chain's last name): an
	// MX name in order whose provider's name is gone or whose provider's
	// servers fail, which the operator should hear named.
	At string
}

func (e *Error) Error() string {
	what := dns.RcodeToString[e.Rcode]
	switch {
	case e.NotFound:
		what = "NXDOMAIN"
	case e.Err != nil:
		what = e.Err.Error()
	}
	if e.At != "" {
		return fmt.Sprintf("%s lookup for %s: %s at %s, the end of its CNAME chain", e.Type, strings.TrimSuffix(e.Name, "."), what, strings.TrimSuffix(e.At, "."))
	}
	return fmt.Sprintf("%s lookup for %s: %s", e.Type, strings.TrimSuffix(e.Name, "."), what)
}

func (e *Error) Unwrap() error { return e.Err }

// Temporary reports whether retrying later may help.
func (e *Error) Temporary() bool { return !e.NotFound }

// ErrCNAMEChain is the error of a lookup whose CNAME chain loops or is
// longer than any real one: the data is broken, not the resolver.
var ErrCNAMEChain = errors.New("CNAME chain too long or looping")

// IsNotFound reports whether err says the name does not exist.
func IsNotFound(err error) bool {
	if err == nil {
		return false
	}
	var e *Error
	return errors.As(err, &e) && e.NotFound
}

// Lookup asks for name's records of qtype, following CNAMEs. A name that
// exists without such records (NODATA) is a Result with no Records.
func (r *Resolver) Lookup(ctx context.Context, name string, qtype uint16) (*Result, error) {
	res := new(Result)
	if err := r.lookup(ctx, name, qtype, res); err != nil {
		return nil, err
	}
	return res, nil
}

// lookup is Lookup filling in res, which the callers that keep no Result
// can have on their stack: a cached answer then costs no allocation.
func (r *Resolver) lookup(ctx context.Context, name string, qtype uint16, res *Result) error {
	name = dns.CanonicalName(name)
	if _, ok := dns.IsDomainName(name); !ok {
		return &Error{Name: name, Type: dns.TypeToString[qtype], Rcode: -1, Err: errors.New("not a domain name")}
	}
	*res = Result{Name: name, Final: name, Secure: true}
	cur := name
	for {
		msg, own, err := r.query(ctx, cur, qtype)
		if err != nil {
			return err
		}
		res.Secure = res.Secure && msg.AuthenticatedData
		if msg.Rcode != dns.RcodeSuccess {
			e := &Error{Name: name, Type: dns.TypeToString[qtype], Rcode: msg.Rcode, NotFound: msg.Rcode == dns.RcodeNameError}
			if end := chainEnd(msg, cur); end != name {
				e.At = end
			}
			return e
		}
		if len(own) > 0 {
			// The records sit at the name asked for: what the walk below
			// would collect, found once per answer rather than per lookup.
			res.Records = own
			return nil
		}
		// Walk the chain inside this answer: resolvers usually return the
		// aliases and the final records together. Records of owners off
		// the chain are ignored, so an answer cannot plant unrelated data.
		for {
			target := ""
			for _, rr := range msg.Answer {
				h := rr.Header()
				if !strings.EqualFold(h.Name, cur) {
					continue
				}
				if h.Class != dns.ClassINET {
					continue // the question is IN; no other class answers it
				}
				if h.Rrtype == qtype {
					res.Records = append(res.Records, rr)
				} else if c, ok := rr.(*dns.CNAME); ok && target == "" {
					target = dns.CanonicalName(c.Target)
				} else if sig, ok := rr.(*dns.RRSIG); ok && sig.TypeCovered == dns.TypeCNAME && cur == name {
					res.AliasSigned = true
				}
			}
			if len(res.Records) > 0 || target == "" || qtype == dns.TypeCNAME {
				return nil
			}
			if target == name || slices.Contains(res.CNAMEs, target) || len(res.CNAMEs) >= maxCNAMEs {
				return &Error{Name: name, Type: dns.TypeToString[qtype], Rcode: -1,
					Err: fmt.Errorf("%w at %s", ErrCNAMEChain, strings.TrimSuffix(target, "."))}
			}
			res.CNAMEs = append(res.CNAMEs, target)
			res.Final, cur = target, target
			if !hasOwner(msg, target) {
				break // the answer stops at an alias: ask for its target
			}
		}
	}
}

// chainEnd returns the last name of the CNAME chain from name in msg's
// answer: name itself when the answer holds no alias for it.
func chainEnd(msg *dns.Msg, name string) string {
	for range maxCNAMEs {
		next := ""
		for _, rr := range msg.Answer {
			if c, ok := rr.(*dns.CNAME); ok && c.Hdr.Class == dns.ClassINET && strings.EqualFold(c.Hdr.Name, name) {
				next = dns.CanonicalName(c.Target)
				break
			}
		}
		if next == "" {
			break
		}
		name = next
	}
	return name
}

// hasOwner reports whether msg has answer records owned by name.
func hasOwner(msg *dns.Msg, name string) bool {
	for _, rr := range msg.Answer {
		if strings.EqualFold(rr.Header().Name, name) {
			return true
		}
	}
	return false
}

// ownRecords returns the answer records of msg that are of qtype and owned
// by name, the question, with no room to append: they are shared by every
// Result made from msg.
func ownRecords(msg *dns.Msg, name string, qtype uint16) []dns.RR {
	var own []dns.RR
	for _, rr := range msg.Answer {
		if h := rr.Header(); h.Rrtype == qtype && h.Class == dns.ClassINET && strings.EqualFold(h.Name, name) {
			own = append(own, rr)
		}
	}
	return slices.Clip(own)
}

// query returns the response for one question, from the cache when fresh,
// with its ownRecords. Concurrent identical queries share one exchange.
func (r *Resolver) query(ctx context.Context, name string, qtype uint16) (*dns.Msg, []dns.RR, error) {
	key := cacheKey{name, qtype}
	r.mu.Lock()
	if e, ok := r.cache[key]; ok && r.now().Before(e.expires) {
		r.mu.Unlock()
		return e.msg, e.own, nil
	}
	c, ok := r.inflight[key]
	if !ok {
		c = &call{done: make(chan struct{})}
		r.inflight[key] = c
		// The exchange is shared, so one caller giving up must not fail the
		// others: it runs detached, bounded by the per-query timeouts.
		go r.share(context.WithoutCancel(ctx), key, c)
	}
	r.mu.Unlock()
	select {
	case <-c.done:
		return c.msg, c.own, c.err
	case <-ctx.Done():
		return nil, nil, &Error{Name: name, Type: dns.TypeToString[qtype], Rcode: -1, Err: ctx.Err()}
	}
}

// share runs the exchange for c, caches a usable answer and wakes the waiters.
func (r *Resolver) share(ctx context.Context, key cacheKey, c *call) {
	c.msg, c.err = r.exchange(ctx, key.name, key.qtype)
	if c.err == nil {
		c.own = ownRecords(c.msg, key.name, key.qtype)
	}
	r.mu.Lock()
	delete(r.inflight, key)
	if c.err == nil && r.maxCache > 0 {
		if ttl := cacheTTL(c.msg, key.qtype); ttl > 0 {
			if len(r.cache) >= r.maxCache {
				r.evictLocked()
			}
			r.cache[key] = &cacheEntry{msg: c.msg, own: c.own, expires: r.now().Add(ttl)}
		}
	}
	r.mu.Unlock()
	close(c.done)
}

// evictLocked drops expired entries, and if none were, an arbitrary tenth.
func (r *Resolver) evictLocked() {
	now := r.now()
	for k, e := range r.cache {
		if !now.Before(e.expires) {
			delete(r.cache, k)
		}
	}
	drop := len(r.cache) - r.maxCache + r.maxCache/10 + 1
	for k := range r.cache {
		if drop <= 0 {
			break
		}
		delete(r.cache, k)
		drop--
	}
}

// ttl31 is a TTL as RFC 2181 §8 reads it: one with the top bit set is 0.
func ttl31(t uint32) uint32 {
	if t > math.MaxInt32 {
		return 0
	}
	return t
}

// cacheTTL is how long msg, the answer to a query for qtype, may be cached:
// the smallest answer TTL; for a negative answer (NXDOMAIN, or no records
// of qtype), also after CNAMEs, no longer than its SOA allows (RFC 2308
// §3, §5). Failures are not cached.
func cacheTTL(msg *dns.Msg, qtype uint16) time.Duration {
	switch msg.Rcode {
	case dns.RcodeSuccess, dns.RcodeNameError:
	default:
		return 0
	}
	ttl, found := uint32(math.MaxUint32), false
	for _, rr := range msg.Answer {
		h := rr.Header()
		ttl = min(ttl, ttl31(h.Ttl))
		found = found || h.Rrtype == qtype
	}
	if found && msg.Rcode == dns.RcodeSuccess {
		return min(time.Duration(ttl)*time.Second, maxTTL)
	}
	for _, rr := range msg.Ns {
		if soa, ok := rr.(*dns.SOA); ok {
			ttl = min(ttl, ttl31(soa.Hdr.Ttl), ttl31(soa.Minttl))
			return min(time.Duration(ttl)*time.Second, negativeTTL)
		}
	}
	if msg.Rcode == dns.RcodeSuccess && len(msg.Answer) > 0 {
		// An answer that stops at an alias, without an SOA: the lookup
		// asks for the target next, so only the aliases are kept.
		return min(time.Duration(ttl)*time.Second, maxTTL)
	}
	return 0 // a negative answer without an SOA says nothing of how long
}

// exchange sends the question to each server in turn until one answers
// with something other than SERVFAIL, REFUSED, NOTIMP or FORMERR. After a SERVFAIL only a
// validated answer (AD) is taken: a validating resolver answers SERVFAIL
// to bogus data, and a later resolver that does not validate may hand on
// the very forgery the first one refused, which would read as insecure.
func (r *Resolver) exchange(ctx context.Context, name string, qtype uint16) (*dns.Msg, error) {
	q := new(dns.Msg)
	q.SetQuestion(name, qtype)
	q.RecursionDesired = true
	// RFC 6840 §5.7: AD in a query asks for the AD bit in the answer; the
	// DO bit (RFC 3225) makes a validating resolver validate for us.
	q.AuthenticatedData = true
	q.SetEdns0(ednsSize, true)

	var last error
	var lastMsg *dns.Msg
	for _, server := range r.servers {
		if err := ctx.Err(); err != nil {
			return nil, &Error{Name: name, Type: dns.TypeToString[qtype], Rcode: -1, Err: err}
		}
		resp, _, err := r.udp.ExchangeContext(ctx, q, server)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() && ctx.Err() == nil {
			// A datagram lost (either way): once more before the next
			// server, as resolv.conf's default attempts:2 has it. With a
			// single nameserver, one lost packet would defer the mail.
			resp, _, err = r.udp.ExchangeContext(ctx, q, server)
		}
		if resp != nil && resp.Truncated {
			// RFC 7766 §5: TC means ask again over TCP, also when the
			// cut left a record half there that would not unpack (the
			// header, with TC, still does).
			resp, _, err = r.tcp.ExchangeContext(ctx, q, server)
		}
		if err == nil {
			err = answers(resp, q.Question[0])
		}
		if err != nil {
			last = err
			continue
		}
		switch {
		case resp.Rcode == dns.RcodeServerFailure:
			if lastMsg == nil || lastMsg.Rcode != dns.RcodeServerFailure {
				lastMsg = resp
			}
			continue
		case resp.Rcode == dns.RcodeRefused, resp.Rcode == dns.RcodeNotImplemented, resp.Rcode == dns.RcodeFormatError:
			// This server will not answer this; another may.
			if lastMsg == nil {
				lastMsg = resp
			}
			continue
		case lastMsg != nil && lastMsg.Rcode == dns.RcodeServerFailure && !resp.AuthenticatedData:
			continue
		}
		return resp, nil
	}
	if lastMsg != nil {
		return lastMsg, nil
	}
	return nil, &Error{Name: name, Type: dns.TypeToString[qtype], Rcode: -1, Err: simplify(last)}
}

// answers checks that resp is a response to the question asked (RFC 1035
// §4.1.1, §7.3; RFC 5452 §9.1): miekg/dns matches only the ID, and a
// query echoed back (it has AD set) would read as a secure empty answer,
// an NXDOMAIN for another name as a bounce for this one.
func answers(resp *dns.Msg, q dns.Question) error {
	if !resp.Response || resp.Opcode != dns.OpcodeQuery || len(resp.Question) != 1 {
		return errors.New("malformed answer: not a response to a query")
	}
	a := resp.Question[0]
	if a.Qtype != q.Qtype || a.Qclass != q.Qclass || !strings.EqualFold(a.Name, q.Name) {
		return fmt.Errorf("malformed answer: for %s %s, not the question asked", a.Name, dns.TypeToString[a.Qtype])
	}
	return nil
}

// simplify turns network errors into the words an operator expects.
func simplify(err error) error {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return errors.New("timeout")
	}
	return err
}

// MX returns the MX records of domain, unsorted, and whether the answer was
// DNSSEC-secure. A domain without MX records returns none and no error.
func (r *Resolver) MX(ctx context.Context, domain string) ([]*dns.MX, bool, error) {
	var res Result
	if err := r.lookup(ctx, domain, dns.TypeMX, &res); err != nil {
		return nil, false, err
	}
	var mxs []*dns.MX
	if len(res.Records) > 0 {
		mxs = make([]*dns.MX, 0, len(res.Records))
	}
	for _, rr := range res.Records {
		mxs = append(mxs, rr.(*dns.MX))
	}
	return mxs, res.Secure, nil
}

// TXT returns each TXT record of name with its strings concatenated
// without spaces (RFC 8461 §3.1, RFC 8460 §3), CNAMEs followed.
func (r *Resolver) TXT(ctx context.Context, name string) ([]string, *Result, error) {
	res, err := r.Lookup(ctx, name, dns.TypeTXT)
	if err != nil {
		return nil, nil, err
	}
	var txts []string
	if len(res.Records) > 0 {
		txts = make([]string, 0, len(res.Records))
	}
	for _, rr := range res.Records {
		txts = append(txts, strings.Join(rr.(*dns.TXT).Txt, ""))
	}
	return txts, res, nil
}

// TLSA returns the TLSA records at name (RFC 6698), CNAMEs followed, with
// the Result that says whether the answer was DNSSEC-secure.
func (r *Resolver) TLSA(ctx context.Context, name string) ([]*dns.TLSA, *Result, error) {
	res, err := r.Lookup(ctx, name, dns.TypeTLSA)
	if err != nil {
		return nil, nil, err
	}
	var out []*dns.TLSA
	for _, rr := range res.Records {
		if t, ok := rr.(*dns.TLSA); ok {
			out = append(out, t)
		}
	}
	return out, res, nil
}

// Servers returns the resolver addresses queries go to, host:port.
func (r *Resolver) Servers() []string { return append([]string(nil), r.servers...) }

// IPVersion restricts which address families are looked up.
type IPVersion int

const (
	IPBoth IPVersion = 0
	IPv4   IPVersion = 4
	IPv6   IPVersion = 6
)

// Addrs returns host's addresses, IPv6 first as RFC 6724 prefers (unless
// version restricts them), following CNAMEs. The Result is that of the
// A lookup (or AAAA when only IPv6 is wanted): it carries the CNAME chain
// and the DNSSEC status of the addresses returned. One family failing is
// not an error when the other answers with addresses.
func (r *Resolver) Addrs(ctx context.Context, host string, version IPVersion) ([]netip.Addr, *Result, error) {
	var (
		addrs   []netip.Addr
		chain   *Result
		errs    []error
		secure  = true
		results [2]Result
		ok      [2]bool
		n       int
	)
	types := []uint16{dns.TypeAAAA, dns.TypeA}
	switch version {
	case IPv4:
		types = types[1:]
	case IPv6:
		types = types[:1]
	}
	for i, t := range types {
		res := &results[i]
		if err := r.lookup(ctx, host, t, res); err != nil {
			errs = append(errs, err)
			continue
		}
		ok[i] = true
		secure = secure && res.Secure
		if chain == nil || t == dns.TypeA {
			chain = res
		}
		n += len(res.Records)
	}
	if n > 0 {
		addrs = make([]netip.Addr, 0, n)
	}
	for i := range results {
		if !ok[i] {
			continue
		}
		for _, rr := range results[i].Records {
			switch v := rr.(type) {
			case *dns.A:
				if a, ok := netip.AddrFromSlice(v.A.To4()); ok {
					addrs = append(addrs, a)
				}
			case *dns.AAAA:
				if a, ok := netip.AddrFromSlice(v.AAAA.To16()); ok {
					addrs = append(addrs, a)
				}
			}
		}
	}
	if chain == nil {
		// Both failed: the A error reads best ("A lookup for x: NXDOMAIN").
		return nil, nil, errs[len(errs)-1]
	}
	if len(addrs) == 0 {
		// No address, but a family failed temporarily: the host may well
		// have addresses, so "none" would turn a DNS hiccup into a bounce.
		for _, err := range errs {
			if !IsNotFound(err) {
				return nil, nil, err
			}
		}
	}
	// Secure speaks of the addresses returned. A family that failed is
	// left out, not counted as insecure: a bogus answer from a validating
	// resolver is a SERVFAIL, and reading it as "insecure" would let
	// whoever forged it turn DANE off (RFC 7672 §2.1.1, §2.2.2).
	out := *chain
	out.Secure = secure
	return addrs, &out, nil
}
