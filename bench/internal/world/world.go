// Package world is the small Internet the relays under benchmark deliver
// into, on loopback addresses only: a DNS server for the recipient
// domains, MTA-STS policy hosts over HTTPS, and a STARTTLS SMTP sink on
// port 25 of every MX address that counts what arrives. Certificates come
// from a CA made for the run.
//
// Every domain N (1..Domains) has its own MX host on 127.0.26.N. The
// "enforce" domains publish an MTA-STS enforce policy naming that MX; the
// "plain" domains publish none, so relays deliver to them with
// opportunistic TLS. One more domain's MX refuses connections, to fill
// queues with deferred mail.
package world

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"strings"
)

// Fixed loopback addresses: the DNS server must be on port 53 because
// Postfix and the MTA-STS resolver read it from resolv.conf, which has no
// port, and MX hosts are dialled on port 25.
const (
	DNSIP     = "127.0.25.53"
	PolicyIP  = "127.0.25.2"
	DeferMXIP = "127.0.25.4" // nothing listens here: connection refused
	mxNet     = "127.0.26."

	// DeferDomain is the domain whose MX refuses connections.
	DeferDomain = "deferred.example"
	// PolicyID is the id of every published MTA-STS policy.
	PolicyID = "bench1"
)

// Kind says whether a domain publishes an MTA-STS policy.
type Kind string

const (
	Enforce Kind = "enforce" // MTA-STS mode enforce, mx: its own MX host
	Plain   Kind = "plain"   // no MTA-STS record
)

// Domain returns the name of domain n (1-based) of a kind.
func Domain(kind Kind, n int) string { return fmt.Sprintf("%s%03d.example", kind, n) }

// Domains returns the first n domains of a kind.
func Domains(kind Kind, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = Domain(kind, i+1)
	}
	return out
}

// MXHost is the MX host name of domain d.
func MXHost(d string) string { return "mx." + d }

// MXIP is the address of the MX host of domain number n.
func MXIP(n int) string { return fmt.Sprintf("%s%d", mxNet, n) }

// Options size the world.
type Options struct {
	// Domains is how many domains of each kind exist (at most 250).
	Domains int
	CA      *CA
}

// World is the running DNS server, policy hosts and sink.
type World struct {
	Sink   *Sink
	dns    *dnsServer
	policy *policyServer
}

// Start starts every part on its fixed address. It needs root, for ports
// 25, 53 and 443.
func Start(opts Options) (_ *World, err error) {
	if opts.Domains < 1 || opts.Domains > 250 {
		return nil, fmt.Errorf("world: %d domains; want 1..250", opts.Domains)
	}
	w := &World{}
	defer func() {
		if err != nil {
			w.Close()
		}
	}()
	certs, err := newCertStore(opts.CA, opts.Domains)
	if err != nil {
		return nil, err
	}
	if w.dns, err = startDNS(net.JoinHostPort(DNSIP, "53"), zone(opts.Domains)); err != nil {
		return nil, fmt.Errorf("world: DNS on %s:53: %w", DNSIP, err)
	}
	if w.policy, err = startPolicy(net.JoinHostPort(PolicyIP, "443"), certs, opts.Domains); err != nil {
		return nil, fmt.Errorf("world: MTA-STS policy host on %s:443: %w", PolicyIP, err)
	}
	var mxAddrs []string
	for n := 1; n <= opts.Domains; n++ {
		mxAddrs = append(mxAddrs, net.JoinHostPort(MXIP(n), "25"))
	}
	if w.Sink, err = startSink(mxAddrs, certs); err != nil {
		return nil, fmt.Errorf("world: sink: %w", err)
	}
	return w, nil
}

// Close stops every part.
func (w *World) Close() error {
	var errs []error
	if w.Sink != nil {
		errs = append(errs, w.Sink.close())
	}
	if w.policy != nil {
		errs = append(errs, w.policy.close())
	}
	if w.dns != nil {
		errs = append(errs, w.dns.close())
	}
	return errors.Join(errs...)
}

// zone is every record the DNS server answers with, in zone-file syntax.
func zone(domains int) []string {
	var rr []string
	for n := 1; n <= domains; n++ {
		for _, kind := range []Kind{Enforce, Plain} {
			d := Domain(kind, n)
			rr = append(rr,
				d+". 3600 IN MX 10 "+MXHost(d)+".",
				MXHost(d)+". 3600 IN A "+MXIP(n),
			)
			if kind == Enforce {
				rr = append(rr,
					"_mta-sts."+d+". 3600 IN TXT \"v=STSv1; id="+PolicyID+"\"",
					"mta-sts."+d+". 3600 IN A "+PolicyIP,
				)
			}
		}
	}
	return append(rr,
		DeferDomain+". 3600 IN MX 10 "+MXHost(DeferDomain)+".",
		MXHost(DeferDomain)+". 3600 IN A "+DeferMXIP,
	)
}

// certStore holds one certificate per host name, chosen by SNI, as real
// MX and policy hosts each have their own.
type certStore struct {
	byName map[string]*tls.Certificate
	def    *tls.Certificate // for clients that send no SNI
}

func newCertStore(ca *CA, domains int) (*certStore, error) {
	s := &certStore{byName: make(map[string]*tls.Certificate)}
	var names []string
	for n := 1; n <= domains; n++ {
		for _, kind := range []Kind{Enforce, Plain} {
			names = append(names, MXHost(Domain(kind, n)))
		}
		names = append(names, "mta-sts."+Domain(Enforce, n))
	}
	for _, name := range names {
		c, err := ca.Issue(name)
		if err != nil {
			return nil, err
		}
		s.byName[name] = &c
	}
	def, err := ca.Issue("sink.bench.example")
	if err != nil {
		return nil, err
	}
	s.def = &def
	return s, nil
}

func (s *certStore) get(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if c := s.byName[strings.ToLower(hello.ServerName)]; c != nil {
		return c, nil
	}
	return s.def, nil
}
