package main

import (
	"context"
	"log/slog"
	"net/http"
	"time"

	"go.etcd.io/bbolt"

	"github.com/stsrelay/stsrelay/config"
	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/resolve"
	"github.com/stsrelay/stsrelay/sts"
)

// deliveryParts are the delivery engine and the policy sources it asks.
// serve and check build them with the same function, so that check
// decides as the relay does.
type deliveryParts struct {
	engine *delivery.Engine
	sts    *sts.Manager // nil when sts.enabled = false
}

// newResolver is the one DNS client, as dns.resolver configures it.
func newResolver(cfg *config.Config) (*resolve.Resolver, error) {
	var servers []string
	if cfg.DNS.Resolver != "" {
		servers = []string{cfg.DNS.Resolver}
	}
	return resolve.New(resolve.Config{Servers: servers, Timeout: cfg.DNS.Timeout.Duration})
}

// buildDelivery wires the policy sources (MTA-STS; DANE joins the chain in
// front of it, RFC 8461 §2) and the engine. db persists the MTA-STS cache;
// nil keeps it in memory (check). rec receives session results for TLS
// reports; nil records nothing (check, or tlsrpt.enabled = false).
func buildDelivery(cfg *config.Config, res *resolve.Resolver, db *bbolt.DB, rec policy.Recorder, logger *slog.Logger) (*deliveryParts, error) {
	p := &deliveryParts{}
	var src policy.PolicySource
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
			FetchTimeout:     cfg.STS.FetchTimeout.Duration,
			FetchWait:        wait,
			MatchCNAMETarget: cfg.STS.MatchCNAMETarget,
			Recorder:         rec,
			Logger:           logger,
		})
		if err != nil {
			return nil, err
		}
		p.sts, src = m, m
	}

	overrides, routes, limits, err := deliveryTables(cfg.Delivery)
	if err != nil {
		return nil, err
	}
	e, err := delivery.New(delivery.Options{
		Hostname:          cfg.Hostname,
		Resolver:          res,
		Policy:            src,
		Overrides:         overrides,
		Routes:            routes,
		Limits:            limits,
		Recorder:          rec,
		IPVersion:         ipVersion(cfg.Delivery.IPVersion),
		ConnectTimeout:    cfg.Delivery.ConnectTimeout.Duration,
		MaxConnsPerDomain: cfg.Delivery.MaxConnsPerDomain,
		Logger:            logger,
	})
	if err != nil {
		return nil, err
	}
	p.engine = e
	return p, nil
}

func (r *relay) registerAdmin(mux *http.ServeMux) {
	if r.sts != nil {
		r.sts.RegisterAdmin(mux)
	}
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
