package main

import (
	"context"
	"net/http"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/resolve"
	"github.com/stsrelay/stsrelay/sts"
)

// policySource builds the DNS-published TLS policies that delivery asks
// before dialing: MTA-STS now; DANE joins the chain in front of it next
// (DESIGN.md decision 3).
func (r *relay) policySource(res *resolve.Resolver) (policy.PolicySource, error) {
	if !r.cfg.STS.Enabled {
		r.logger.Warn("MTA-STS is disabled (sts.enabled = false): no domain's policy is enforced")
		return nil, nil
	}
	m, err := sts.New(sts.Options{
		Resolver:         res,
		DB:               r.db,
		FetchTimeout:     r.cfg.STS.FetchTimeout.Duration,
		MatchCNAMETarget: r.cfg.STS.MatchCNAMETarget,
		Logger:           r.logger,
	})
	if err != nil {
		return nil, err
	}
	r.sts = m
	return m, nil
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
