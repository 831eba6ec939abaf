// Package dnstest runs a real DNS server on loopback for tests. It answers
// like a recursive, validating resolver would: it follows CNAMEs within its
// data and sets the AD bit when every name on the chain is marked secure.
// Faults (SERVFAIL, silence, truncation, garbage, wrong IDs) are set per
// name.
package dnstest

import (
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// Fault is a misbehaviour for queries about one name.
type Fault int

const (
	FaultNone     Fault = iota
	FaultServfail       // answer SERVFAIL
	FaultRefused        // answer REFUSED
	FaultDrop           // never answer (the client times out)
	FaultTruncate       // over UDP, answer empty with TC set, forcing TCP
	FaultGarbage        // answer with bytes that are not a DNS message
	// FaultWrongID answers with another message ID only, as an off-path
	// spoofer guessing wrong would: the client must ignore it (and time out).
	FaultWrongID
	// FaultWrongIDFirst sends a SERVFAIL with another ID, then the real
	// answer: a client that ignores the first gets the second.
	FaultWrongIDFirst
	// FaultEcho sends the query back as it came (QR clear, AD set, no
	// records), as a broken middlebox might.
	FaultEcho
	// FaultWrongQuestion answers NXDOMAIN, with the right ID, for
	// another name than the one asked.
	FaultWrongQuestion
	// FaultCutTruncate answers over UDP with TC set and the datagram cut
	// inside a record, as a proxy that truncates by bytes does; over TCP
	// the whole answer.
	FaultCutTruncate
	// FaultNotImp answers NOTIMP, as a server that does not do the query
	// type (an old forwarder and TLSA, say).
	FaultNotImp
	// FaultDropFirst drops the first query, as a lost datagram, and
	// answers the rest.
	FaultDropFirst
)

// Server is a DNS server on 127.0.0.1, UDP and TCP on the same port.
type Server struct {
	Addr string // host:port, for resolve.Config.Servers

	mu      sync.Mutex
	records map[string][]dns.RR // by canonical owner name
	secure  map[string]bool
	faults  map[faultKey]Fault
	delays  map[string]time.Duration
	queries map[faultKey]int
	udp     *dns.Server
	tcp     *dns.Server
}

type faultKey struct {
	name  string
	qtype uint16 // 0 = any type
}

// New starts a server with records in zone-file syntax, one per string
// ("example.com. 300 IN MX 10 mx.example.com."), and stops it when t ends.
func New(t testing.TB, records ...string) *Server {
	t.Helper()
	s := &Server{
		records: make(map[string][]dns.RR),
		secure:  make(map[string]bool),
		faults:  make(map[faultKey]Fault),
		delays:  make(map[string]time.Duration),
		queries: make(map[faultKey]int),
	}
	for _, r := range records {
		s.Add(t, r)
	}
	// The UDP port the kernel picks may be taken for TCP: pick again.
	var (
		pc  net.PacketConn
		l   net.Listener
		err error
	)
	for attempt := 0; ; attempt++ {
		pc, err = net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("dnstest: %v", err)
		}
		l, err = net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			break
		}
		pc.Close()
		if attempt == 50 {
			t.Fatalf("dnstest: %v", err)
		}
	}
	s.Addr = pc.LocalAddr().String()
	started := make(chan struct{}, 2)
	notify := func() { started <- struct{}{} }
	s.udp = &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(s.serveUDP), NotifyStartedFunc: notify}
	s.tcp = &dns.Server{Listener: l, Handler: dns.HandlerFunc(s.serveTCP), NotifyStartedFunc: notify}
	go s.udp.ActivateAndServe()
	go s.tcp.ActivateAndServe()
	<-started
	<-started
	t.Cleanup(func() {
		s.udp.Shutdown()
		s.tcp.Shutdown()
	})
	return s
}

// Add adds one record in zone-file syntax.
func (s *Server) Add(t testing.TB, record string) {
	t.Helper()
	rr, err := dns.NewRR(record)
	if err != nil || rr == nil {
		t.Fatalf("dnstest: bad record %q: %v", record, err)
	}
	name := dns.CanonicalName(rr.Header().Name)
	s.mu.Lock()
	s.records[name] = append(s.records[name], rr)
	s.mu.Unlock()
}

// AddRR adds one record as it is, for data that zone-file syntax cannot
// express (a dns.RFC3597 with a known type carries malformed RDATA).
func (s *Server) AddRR(rr dns.RR) {
	name := dns.CanonicalName(rr.Header().Name)
	s.mu.Lock()
	s.records[name] = append(s.records[name], rr)
	s.mu.Unlock()
}

// Remove deletes every record of name with type qtype (0 = all types).
func (s *Server) Remove(name string, qtype uint16) {
	name = dns.CanonicalName(name)
	s.mu.Lock()
	defer s.mu.Unlock()
	var keep []dns.RR
	for _, rr := range s.records[name] {
		if qtype != 0 && rr.Header().Rrtype != qtype {
			keep = append(keep, rr)
		}
	}
	s.records[name] = keep
}

// Secure marks names as DNSSEC-validated: answers whose every name is
// secure carry the AD bit, and a query with DO gets each RRset of a
// secure name with an RRSIG, as from a validating resolver (a placeholder
// signature: clients trust the resolver's AD bit, not their own check).
func (s *Server) Secure(names ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range names {
		s.secure[dns.CanonicalName(n)] = true
	}
}

// SetFault makes queries for name and qtype (0 = any type) misbehave.
func (s *Server) SetFault(name string, qtype uint16, f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults[faultKey{dns.CanonicalName(name), qtype}] = f
}

// SetDelay makes every answer about name wait d before it is sent.
func (s *Server) SetDelay(name string, d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.delays[dns.CanonicalName(name)] = d
}

// Queries returns how many queries for name and qtype (0 = any) arrived.
func (s *Server) Queries(name string, qtype uint16) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	name = dns.CanonicalName(name)
	if qtype != 0 {
		return s.queries[faultKey{name, qtype}]
	}
	n := 0
	for k, c := range s.queries {
		if k.name == name {
			n += c
		}
	}
	return n
}

func (s *Server) serveUDP(w dns.ResponseWriter, q *dns.Msg) { s.serve(w, q, false) }
func (s *Server) serveTCP(w dns.ResponseWriter, q *dns.Msg) { s.serve(w, q, true) }

func (s *Server) serve(w dns.ResponseWriter, q *dns.Msg, tcp bool) {
	if len(q.Question) != 1 {
		m := new(dns.Msg)
		m.SetRcode(q, dns.RcodeFormatError)
		w.WriteMsg(m)
		return
	}
	question := q.Question[0]
	name := dns.CanonicalName(question.Name)

	s.mu.Lock()
	s.queries[faultKey{name, question.Qtype}]++
	fault := s.faults[faultKey{name, question.Qtype}]
	if fault == FaultNone {
		fault = s.faults[faultKey{name, 0}]
	}
	if fault == FaultDropFirst {
		if s.queries[faultKey{name, question.Qtype}] > 1 {
			fault = FaultNone
		} else {
			fault = FaultDrop
		}
	}
	delay := s.delays[name]
	s.mu.Unlock()
	time.Sleep(delay)

	m := new(dns.Msg)
	m.SetReply(q)
	m.RecursionAvailable = true
	switch fault {
	case FaultDrop:
		return
	case FaultServfail:
		m.Rcode = dns.RcodeServerFailure
		w.WriteMsg(m)
		return
	case FaultRefused:
		m.Rcode = dns.RcodeRefused
		w.WriteMsg(m)
		return
	case FaultNotImp:
		m.Rcode = dns.RcodeNotImplemented
		w.WriteMsg(m)
		return
	case FaultGarbage:
		w.Write([]byte{0xde, 0xad, 0xbe, 0xef})
		return
	case FaultEcho:
		w.WriteMsg(q)
		return
	case FaultWrongQuestion:
		m.SetQuestion("nonexistent.invalid.", dns.TypeA)
		m.Id, m.Response, m.Rcode = q.Id, true, dns.RcodeNameError
		m.Ns = []dns.RR{soa("invalid.")}
		w.WriteMsg(m)
		return
	case FaultTruncate:
		if !tcp {
			m.Truncated = true
			w.WriteMsg(m)
			return
		}
	}

	s.mu.Lock()
	answer, rcode, secure := s.resolveLocked(name, question.Qtype)
	if o := q.IsEdns0(); o != nil && o.Do() {
		answer = s.signLocked(answer)
	}
	s.mu.Unlock()
	m.Answer = answer
	m.Rcode = rcode
	if rcode == dns.RcodeNameError || len(answer) == 0 {
		m.Ns = []dns.RR{soa(name)}
	}
	size := dns.MinMsgSize
	if o := q.IsEdns0(); o != nil {
		m.SetEdns0(4096, o.Do())
		m.AuthenticatedData = secure && o.Do()
		size = int(o.UDPSize())
	}
	if fault == FaultCutTruncate && !tcp {
		m.Truncated = true
		b, err := m.Pack()
		if err == nil && len(b) > 40 {
			w.Write(b[:len(b)-5]) // the last record cut short
			return
		}
	}
	if !tcp {
		// As a real server does: what does not fit the client's buffer is
		// cut, with TC set, so the client asks again over TCP.
		m.Truncate(size)
	}
	switch fault {
	case FaultWrongID:
		m.Id ^= 0x5a5a
	case FaultWrongIDFirst:
		bogus := new(dns.Msg)
		bogus.SetRcode(q, dns.RcodeServerFailure)
		bogus.Id ^= 0x5a5a
		w.WriteMsg(bogus)
	}
	w.WriteMsg(m)
}

// resolveLocked builds the answer a recursive resolver would give.
func (s *Server) resolveLocked(name string, qtype uint16) ([]dns.RR, int, bool) {
	var answer []dns.RR
	secure := s.secure[name]
	seen := map[string]bool{}
	for range 16 {
		seen[name] = true
		rrs := s.records[name]
		var cname *dns.CNAME
		found := false
		for _, rr := range rrs {
			if rr.Header().Rrtype == qtype {
				answer = append(answer, dns.Copy(rr))
				found = true
			} else if c, ok := rr.(*dns.CNAME); ok {
				cname = c
			}
		}
		if found || cname == nil || qtype == dns.TypeCNAME {
			if !found && len(rrs) == 0 && !s.hasChildrenLocked(name) {
				return answer, dns.RcodeNameError, secure
			}
			return answer, dns.RcodeSuccess, secure
		}
		answer = append(answer, dns.Copy(cname))
		name = dns.CanonicalName(cname.Target)
		secure = secure && s.secure[name]
		if seen[name] {
			return answer, dns.RcodeSuccess, secure // a loop: hand it to the client as is
		}
	}
	return answer, dns.RcodeServerFailure, false
}

// signLocked puts an RRSIG after each RRset of a secure name in answer.
func (s *Server) signLocked(answer []dns.RR) []dns.RR {
	var out []dns.RR
	for i, rr := range answer {
		out = append(out, rr)
		h := rr.Header()
		if next := i + 1; next < len(answer) && answer[next].Header().Name == h.Name && answer[next].Header().Rrtype == h.Rrtype {
			continue // not the RRset's last record
		}
		if !s.secure[dns.CanonicalName(h.Name)] {
			continue
		}
		out = append(out, &dns.RRSIG{
			Hdr:         dns.RR_Header{Name: h.Name, Rrtype: dns.TypeRRSIG, Class: dns.ClassINET, Ttl: h.Ttl},
			TypeCovered: h.Rrtype, Algorithm: dns.ECDSAP256SHA256, Labels: uint8(dns.CountLabel(h.Name)),
			OrigTtl: h.Ttl, Expiration: 4102444800, Inception: 1700000000, KeyTag: 1,
			SignerName: h.Name, Signature: "c2lnbmF0dXJl"})
	}
	return out
}

// hasChildrenLocked reports whether name is an empty non-terminal.
func (s *Server) hasChildrenLocked(name string) bool {
	for owner, rrs := range s.records {
		if len(rrs) > 0 && strings.HasSuffix(owner, "."+name) {
			return true
		}
	}
	return false
}

func soa(name string) dns.RR {
	return &dns.SOA{
		Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: 60},
		Ns:  "ns.test.", Mbox: "hostmaster.test.", Serial: 1,
		Refresh: 3600, Retry: 600, Expire: 86400, Minttl: 60,
	}
}
