package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync/atomic"
	"time"

	"go.etcd.io/bbolt"

	"github.com/stsrelay/stsrelay/config"
	"github.com/stsrelay/stsrelay/dane"
	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/resolve"
	"github.com/stsrelay/stsrelay/routing"
	"github.com/stsrelay/stsrelay/sts"
)

// deliveryParts are the delivery engine and the policy sources it asks.
// serve and check build them with the same function, so that check
// decides as the relay does.
type deliveryParts struct {
	engine *delivery.Engine
	sts    *sts.Manager // nil when sts.enabled = false
	dane   *dane.Source
	// daneScope, with dane.enabled = false, holds the [[delivery.policy]]
	// entries that still ask for DANE; reloads replace it.
	daneScope *atomic.Pointer[routing.Table[bool]]
}

// newResolver is the one DNS client, as dns.resolver configures it.
func newResolver(cfg *config.Config) (*resolve.Resolver, error) {
	var servers []string
	if cfg.DNS.Resolver != "" {
		servers = []string{cfg.DNS.Resolver}
	}
	return resolve.New(resolve.Config{Servers: servers, Timeout: cfg.DNS.Timeout.Duration})
}

// buildDelivery wires the policy sources, DANE in front of MTA-STS (RFC
// 8461 §2; docs/DESIGN.md, "Security policy precedence"), and the engine. db persists the MTA-STS
// cache; nil keeps it in memory (check). rec receives session results for
// TLS reports; nil records nothing (check, or tlsrpt.enabled = false).
func buildDelivery(cfg *config.Config, res *resolve.Resolver, db *bbolt.DB, update func(func(*bbolt.Tx) error) error, rec policy.Recorder, logger *slog.Logger) (*deliveryParts, error) {
	p := &deliveryParts{daneScope: &atomic.Pointer[routing.Table[bool]]{}}
	var sources []policy.PolicySource

	opts := dane.Options{Resolver: res, Logger: logger}
	if !cfg.DANE.Enabled {
		// Off, but a tls = "dane" or "dane-only" entry still asks for it
		// for its domains; the source stays, so a reload can add some.
		scope, err := daneScope(cfg.Delivery)
		if err != nil {
			return nil, err
		}
		p.daneScope.Store(scope)
		opts.Only = func(domain string) bool {
			want, _, _ := p.daneScope.Load().Lookup(domain, "")
			return want
		}
	}
	d, err := dane.New(opts)
	if err != nil {
		return nil, err
	}
	p.dane = d
	sources = append(sources, d)

	if cfg.STS.Enabled {
		var wait time.Duration // the daemon defers after sts.DefaultFetchWait
		if db == nil {
			// check runs once, with no later attempt to find the policy
			// cached: it waits for the whole fetch.
			wait = cfg.STS.FetchTimeout.Duration
		}
		m, err := sts.New(sts.Options{
			Resolver:         res,
			DB:               db,
			Update:           update,
			FetchTimeout:     cfg.STS.FetchTimeout.Duration,
			FetchWait:        wait,
			MatchCNAMETarget: cfg.STS.MatchCNAMETarget,
			Recorder:         rec,
			Logger:           logger,
		})
		if err != nil {
			return nil, err
		}
		p.sts = m
		sources = append(sources, m)
	}

	overrides, routes, limits, err := deliveryTables(cfg.Delivery)
	if err != nil {
		return nil, err
	}
	e, err := delivery.New(delivery.Options{
		Hostname:          cfg.Hostname,
		Resolver:          res,
		Policy:            policy.Chain(sources...),
		Overrides:         overrides,
		Routes:            routes,
		Limits:            limits,
		Recorder:          rec,
		IPVersion:         ipVersion(cfg.Delivery.IPVersion),
		ConnectTimeout:    cfg.Delivery.ConnectTimeout.Duration,
		MaxConnsPerDomain: cfg.Delivery.MaxConnsPerDomain,
		NoChunking:        !cfg.Delivery.Chunking,
		Logger:            logger,
	})
	if err != nil {
		return nil, err
	}
	p.engine = e
	return p, nil
}

// daneScope is the table of [[delivery.policy]] entries, true where the
// entry asks for DANE (dane, dane-only): matched as delivery matches them,
// the most specific entry deciding.
func daneScope(d config.Delivery) (*routing.Table[bool], error) {
	var entries []routing.Entry[bool]
	for i, p := range d.Policies {
		l, err := policy.ParseLocal(p.TLS)
		if err != nil {
			return nil, fmt.Errorf("delivery.policy[%d]: %w", i, err)
		}
		var pats []routing.Pattern
		for _, s := range p.Domains {
			pat, err := routing.ParsePattern(s)
			if err != nil {
				return nil, fmt.Errorf("delivery.policy[%d]: %w", i, err)
			}
			pats = append(pats, pat)
		}
		entries = append(entries, routing.Entry[bool]{Domains: pats, Value: l.WantsDANE()})
	}
	return routing.NewTable(entries)
}

// policyWarnings are the start-up warnings about the TLS policies that
// the configuration leaves unenforced, or founded on an unprotected path.
func policyWarnings(cfg *config.Config, res *resolve.Resolver) []string {
	var out []string
	someDANE := cfg.DANE.Enabled
	if !cfg.DANE.Enabled {
		msg := "DANE is disabled (dane.enabled = false): no domain's TLSA records are enforced"
		for _, p := range cfg.Delivery.Policies {
			if l, err := policy.ParseLocal(p.TLS); err == nil && l.WantsDANE() {
				msg = "DANE is disabled (dane.enabled = false) except where a [[delivery.policy]] entry says dane or dane-only"
				someDANE = true
				break
			}
		}
		out = append(out, msg)
	}
	if remote := remoteResolvers(res.Servers()); someDANE && len(remote) > 0 && !cfg.DANE.TrustRemoteResolver {
		out = append(out, fmt.Sprintf("DANE trusts the DNSSEC status (AD bit) of resolver %v, which is not on this host: anyone on the path "+
			"could forge it; run a validating resolver on loopback, or set dane.trust_remote_resolver = true if the path is protected", remote))
	}
	if !cfg.STS.Enabled {
		out = append(out, "MTA-STS is disabled (sts.enabled = false): no domain's policy is enforced")
	}
	return append(out, routeWarnings(cfg)...)
}

// routeWarnings names the route settings a postmaster most likely did not
// mean, which the configuration still allows.
func routeWarnings(cfg *config.Config) []string {
	var out []string
	for i, r := range cfg.Delivery.Routes {
		key := fmt.Sprintf("delivery.route[%d]", i)
		if r.AuthUsername != "" {
			switch r.TLS {
			case "may", "encrypt", "dane":
				// "dane" checks a certificate only where TLSA records are.
				out = append(out, fmt.Sprintf("%s sends its password over TLS whose certificate may go unchecked (tls = %q): "+
					"anyone on the path can take it; use verify (the default with credentials) or dane-only", key, r.TLS))
			}
			// Group stsrelay reading it, mode 0640, is the README's setup.
			if fi, err := os.Stat(r.AuthPasswordFile); err == nil && fi.Mode().Perm()&0o007 != 0 {
				out = append(out, fmt.Sprintf("%s.auth_password_file %s can be read by every user (mode %04o); chmod o-rwx it",
					key, r.AuthPasswordFile, fi.Mode().Perm()))
			}
		}
		hop, err := routing.ParseNexthop(r.Nexthop)
		switch {
		case err != nil:
		case hop.Port == 465 && !r.ImplicitTLS:
			out = append(out, fmt.Sprintf("%s: port 465 is for TLS from the first byte (RFC 8314); without implicit_tls = true "+
				"every attempt waits out the greeting timeout", key))
		case hop.Port == 25 && r.ImplicitTLS:
			out = append(out, fmt.Sprintf("%s: implicit_tls = true on port 25, where servers speak plaintext first and offer STARTTLS", key))
		}
	}
	return out
}

// remoteResolvers returns the resolver addresses that are not loopback:
// the AD bit from those crosses a network unprotected (RFC 4035 §4.9.3).
func remoteResolvers(servers []string) []string {
	var out []string
	for _, s := range servers {
		host, _, err := net.SplitHostPort(s)
		if err != nil {
			host = s
		}
		if host == "localhost" {
			continue
		}
		if a, err := netip.ParseAddr(host); err == nil && a.Unmap().IsLoopback() {
			continue
		}
		out = append(out, s)
	}
	return out
}

func (r *relay) registerSTS(mux *http.ServeMux) {
	if r.sts == nil {
		sts.RegisterDisabled(mux)
		return
	}
	r.sts.RegisterAdmin(mux)
}

// startPolicy runs the background refresh of cached policies until ctx ends.
func (r *relay) startPolicy(ctx context.Context) {
	if r.sts == nil {
		return
	}
	r.done.Add(1)
	go func() {
		defer r.done.Done()
		r.sts.Run(ctx)
	}()
}
