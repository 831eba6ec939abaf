package resolve

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"
)

// DialFunc connects to a network address, as net.Dialer's DialContext does.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// Dialer returns a DialFunc for the HTTPS clients of stsrelay (MTA-STS
// policy fetches, TLS reports). The host's addresses come from r, like
// every other lookup, so the configured resolver is the only one and a
// host behind a CNAME (a hosted MTA-STS service) works. They are tried in
// turn, IPv6 first, each with an equal share of the time left, so an
// address that never answers cannot use up the whole budget and leave the
// others untried.
//
// dial connects to one address; nil means a net.Dialer. budget bounds the
// whole dial, since net/http may dial with a context that lacks the
// request's deadline; 0 leaves the bound to the context alone.
func (r *Resolver) Dialer(dial DialFunc, budget time.Duration) DialFunc {
	if dial == nil {
		d := &net.Dialer{}
		dial = d.DialContext
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var end time.Time
		if budget > 0 {
			end = time.Now().Add(budget)
		}
		host, port, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, err
		}
		addrs, _, err := r.Addrs(ctx, host, IPBoth)
		if err != nil {
			return nil, err
		}
		if len(addrs) == 0 {
			return nil, fmt.Errorf("%s has no addresses", host)
		}
		var errs []error
		for i, a := range addrs {
			actx, cancel := ctx, context.CancelFunc(func() {})
			if left, ok := timeLeft(ctx, end); ok {
				actx, cancel = context.WithTimeout(ctx, left/time.Duration(len(addrs)-i))
			}
			c, err := dial(actx, network, net.JoinHostPort(a.String(), port))
			cancel()
			if err == nil {
				return c, nil
			}
			errs = append(errs, err)
			if ctx.Err() != nil {
				break
			}
		}
		return nil, errors.Join(errs...)
	}
}

// timeLeft is the time a dial has until end or the context's deadline,
// whichever comes first; ok is false when neither bounds it.
func timeLeft(ctx context.Context, end time.Time) (left time.Duration, ok bool) {
	dl, hasDL := ctx.Deadline()
	switch {
	case end.IsZero() && !hasDL:
		return 0, false
	case end.IsZero() || hasDL && dl.Before(end):
		return time.Until(dl), true
	default:
		return time.Until(end), true
	}
}
