package dkimsign

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

var metricSigned = promauto.NewCounterVec(prometheus.CounterOpts{
	Name: "stsrelay_dkim_relayed_total",
	Help: "Delivery attempts of relayed mail that a sign_relayed key applied to, by result: signed, failed (sent unsigned), not_allowed (From: is not a sender the login may use; sent unsigned), unsignable (no single From: address in a message whose MAIL FROM domain has a key; sent unsigned).",
}, []string{"result"})
