package smtpin

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

var (
	metricConnections = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "stsrelay_smtpin_connections_total",
		Help: "Client connections, by listener (submission, submissions) and result (accepted, too_many from one client, server_full).",
	}, []string{"listener", "result"})
	metricAuth = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "stsrelay_smtpin_auth_total",
		Help: "AUTH attempts, by result: success, failure, rate_limited, refused_plaintext.",
	}, []string{"result"})
	metricAccepted = promauto.NewCounter(prometheus.CounterOpts{
		Name: "stsrelay_smtpin_messages_accepted_total",
		Help: "Messages committed to the queue.",
	})
	metricCutOff = promauto.NewCounter(prometheus.CounterOpts{
		Name: "stsrelay_smtpin_connections_cut_off_total",
		Help: "Sessions ended by smtpin mid-way: failed STARTTLS handshake, rejected message not finished in time, too much sent without waiting for a reply.",
	})
	metricPanics = promauto.NewCounter(prometheus.CounterOpts{
		Name: "stsrelay_smtpin_panics_recovered_total",
		Help: "Panics in a session that go-smtp recovered from: the session ended with 421.",
	})
	metricRejected = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "stsrelay_smtpin_messages_rejected_total",
		Help: "Refused MAIL, RCPT and message transfers, by reason.",
	}, []string{"reason"})
)
