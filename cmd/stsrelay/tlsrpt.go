package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/http"

	"github.com/stsrelay/stsrelay/config"
	"github.com/stsrelay/stsrelay/dkimsign"
	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/resolve"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// newReporter builds TLS reporting from [tlsrpt] and [[dkim]], before the
// parts that record into it (delivery, sts); nil when it is off.
func (r *relay) newReporter(res *resolve.Resolver) error {
	c := r.cfg.TLSRPT
	if !c.Enabled {
		return nil
	}
	var keys []tlsrpt.DKIMKey
	for i, k := range r.cfg.DKIM {
		signer, err := tlsrpt.LoadDKIMKey(k.KeyFile)
		if err != nil {
			return fmt.Errorf("dkim[%d].key_file: %w", i, err)
		}
		keys = append(keys, tlsrpt.DKIMKey{Domain: k.Domain, Selector: k.Selector, Signer: signer})
	}
	rep, err := tlsrpt.New(tlsrpt.Options{
		DB:               r.db,
		Update:           r.writes.update,
		Resolver:         res,
		Queue:            r, // the queue is made later; see Enqueue
		OrganizationName: c.OrganizationName,
		ContactInfo:      c.ContactInfo,
		Sender:           c.ReportSender,
		Hostname:         r.cfg.Hostname,
		DKIM:             keys,
		MaxDelay:         c.MaxDelay.Duration,
		Logger:           r.logger,
	})
	if err != nil {
		return err
	}
	if !rep.CanSign() {
		r.warn("tlsrpt: no [[dkim]] key for the report sender's domain: reports cannot go to mailto: addresses (RFC 8460 §3 makes receivers ignore unsigned ones)",
			"report_sender", rep.Sender())
	}
	r.tlsrpt = rep
	return nil
}

// newSigner loads the [[dkim]] keys with sign_relayed; nil when there are
// none. senderAllowed is submission's rule for a login's senders.
func newSigner(cfg *config.Config, logger *slog.Logger, senderAllowed func(user, address string) bool) (*dkimsign.Signer, error) {
	var keys []dkimsign.Key
	for i, k := range cfg.DKIM {
		if !k.SignRelayed {
			continue
		}
		signer, err := tlsrpt.LoadDKIMKey(k.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("dkim[%d].key_file: %w", i, err)
		}
		keys = append(keys, dkimsign.Key{Domain: k.Domain, Selector: k.Selector, Signer: signer})
	}
	if len(keys) == 0 {
		return nil, nil
	}
	return dkimsign.New(dkimsign.Options{Keys: keys, SenderAllowed: senderAllowed, Logger: logger})
}

// Enqueue hands report mail to the queue (tlsrpt.Enqueuer).
func (r *relay) Enqueue(ctx context.Context, env queue.Envelope, body io.Reader) (string, error) {
	if r.queue == nil {
		return "", fmt.Errorf("the queue is not open")
	}
	return r.queue.Enqueue(ctx, env, body)
}

// recorder is where delivery and sts report session results; nil when TLS
// reporting is off.
func (r *relay) recorder() policy.Recorder {
	if r.tlsrpt == nil {
		return nil
	}
	return r.tlsrpt
}

func (r *relay) registerTLSRPT(mux *http.ServeMux) {
	if r.tlsrpt == nil {
		tlsrpt.RegisterDisabled(mux)
		return
	}
	r.tlsrpt.RegisterAdmin(mux)
}

// startTLSRPT runs the daily reports until ctx ends.
func (r *relay) startTLSRPT(ctx context.Context) {
	if r.tlsrpt == nil {
		return
	}
	r.done.Add(1)
	go func() {
		defer r.done.Done()
		r.tlsrpt.Run(ctx)
	}()
}
