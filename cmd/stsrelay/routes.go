package main

import (
	"fmt"

	"golang.org/x/time/rate"

	"github.com/stsrelay/stsrelay/config"
	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/policy"
)

// deliveryTables converts [[delivery.policy]], [[delivery.route]] and
// [[delivery.limits]] for the delivery engine; config has validated them.
func deliveryTables(d config.Delivery) ([]delivery.Override, []delivery.Route, []delivery.Limit, error) {
	var overrides []delivery.Override
	for i, p := range d.Policies {
		l, err := policy.ParseLocal(p.TLS)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("delivery.policy[%d]: %w", i, err)
		}
		overrides = append(overrides, delivery.Override{Name: fmt.Sprintf("delivery.policy[%d]", i),
			Domains: p.Domains, TLS: l.Security, Published: l.Published})
	}
	var routes []delivery.Route
	for i, r := range d.Routes {
		dr := delivery.Route{
			Name:        fmt.Sprintf("delivery.route[%d]", i),
			Domains:     r.Domains,
			Senders:     r.Senders,
			Nexthop:     r.Nexthop,
			ImplicitTLS: r.ImplicitTLS,
			TLS:         r.TLS,
			Shaping:     shaping(r.Shaping),
		}
		if r.AuthUsername != "" {
			dr.Auth = &delivery.Credentials{Username: r.AuthUsername, Password: r.AuthPassword.Reveal()}
		}
		routes = append(routes, dr)
	}
	var limits []delivery.Limit
	for _, l := range d.Limits {
		limits = append(limits, delivery.Limit{Domains: l.Domains, MXHosts: l.MXHosts, Shaping: shaping(l.Shaping)})
	}
	return overrides, routes, limits, nil
}

func shaping(s config.Shaping) delivery.Shaping {
	return delivery.Shaping{
		MaxConnections:     s.MaxConnections,
		MaxMessagesPerConn: s.MaxMessagesPerConn,
		Rate:               rate.Limit(s.Rate.PerSecond()),
	}
}
