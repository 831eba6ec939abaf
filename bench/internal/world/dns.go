package world

import (
	"errors"
	"net"
	"strings"

	"github.com/miekg/dns"
)

// dnsServer answers like a recursive resolver that has every record of the
// world cached: NXDOMAIN for names it does not know, an empty answer for
// types a known name lacks.
type dnsServer struct {
	records map[string][]dns.RR // by lower-case owner name with final dot
	soa     dns.RR
	addr    string // UDP
	udp     *dns.Server
	tcp     *dns.Server
}

func startDNS(addr string, zone []string) (*dnsServer, error) {
	s := &dnsServer{records: make(map[string][]dns.RR)}
	for _, line := range zone {
		rr, err := dns.NewRR(line)
		if err != nil {
			return nil, err
		}
		name := strings.ToLower(rr.Header().Name)
		s.records[name] = append(s.records[name], rr)
	}
	soa, err := dns.NewRR("example. 3600 IN SOA ns.example. hostmaster.example. 1 3600 600 86400 300")
	if err != nil {
		return nil, err
	}
	s.soa = soa

	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		pc.Close()
		return nil, err
	}
	s.addr = pc.LocalAddr().String()
	s.udp = &dns.Server{PacketConn: pc, Handler: s}
	s.tcp = &dns.Server{Listener: l, Handler: s}
	go s.udp.ActivateAndServe()
	go s.tcp.ActivateAndServe()
	return s, nil
}

func (s *dnsServer) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(req)
	m.RecursionAvailable = true
	if opt := req.IsEdns0(); opt != nil {
		m.SetEdns0(opt.UDPSize(), false)
	}
	if len(req.Question) != 1 {
		m.Rcode = dns.RcodeFormatError
		w.WriteMsg(m)
		return
	}
	q := req.Question[0]
	rrs, known := s.records[strings.ToLower(q.Name)]
	for _, rr := range rrs {
		if rr.Header().Rrtype == q.Qtype || q.Qtype == dns.TypeANY {
			rr = dns.Copy(rr)
			rr.Header().Name = q.Name
			m.Answer = append(m.Answer, rr)
		}
	}
	if len(m.Answer) == 0 {
		if !known {
			m.Rcode = dns.RcodeNameError
		}
		m.Ns = []dns.RR{s.soa}
	}
	w.WriteMsg(m)
}

func (s *dnsServer) close() error {
	return errors.Join(s.udp.Shutdown(), s.tcp.Shutdown())
}
