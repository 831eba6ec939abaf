package resolve

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/dnstest"
)

// hangingIP never answers: dials to it wait until their context ends.
const hangingIP = "fd00::dead"

// dialOrHang connects for real, except to hangingIP.
func dialOrHang(ctx context.Context, network, addr string) (net.Conn, error) {
	if host, _, _ := net.SplitHostPort(addr); host == hangingIP {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	var d net.Dialer
	return d.DialContext(ctx, network, addr)
}

// listen accepts connections on loopback and returns the port.
func listen(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	return port
}

func dialed(t *testing.T, c net.Conn, err error, wantIP string) {
	t.Helper()
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	if host, _, _ := net.SplitHostPort(c.RemoteAddr().String()); host != wantIP {
		t.Errorf("connected to %s, want %s", c.RemoteAddr(), wantIP)
	}
}

// TestDialerTriesTheNextAddressWhenOneHangs: the IPv6 address comes first
// and never answers; it gets half the budget, not all of it.
func TestDialerTriesTheNextAddressWhenOneHangs(t *testing.T) {
	s := dnstest.New(t,
		"mta-sts.example.com. 300 IN AAAA "+hangingIP,
		"mta-sts.example.com. 300 IN A 127.0.0.1")
	port := listen(t)
	dial := newResolver(t, s).Dialer(dialOrHang, 2*time.Second)
	c, err := dial(t.Context(), "tcp", net.JoinHostPort("mta-sts.example.com", port))
	dialed(t, c, err, "127.0.0.1")
}

// TestDialerSharesTheContextDeadlineWithoutABudget: with no budget of its
// own the dial splits the context's time the same way.
func TestDialerSharesTheContextDeadlineWithoutABudget(t *testing.T) {
	s := dnstest.New(t,
		"mta-sts.example.com. 300 IN AAAA "+hangingIP,
		"mta-sts.example.com. 300 IN A 127.0.0.1")
	port := listen(t)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	c, err := newResolver(t, s).Dialer(dialOrHang, 0)(ctx, "tcp", net.JoinHostPort("mta-sts.example.com", port))
	dialed(t, c, err, "127.0.0.1")
}

// TestDialerFollowsCNAME: hosted MTA-STS services put the policy host
// behind a CNAME; the addresses are the target's.
func TestDialerFollowsCNAME(t *testing.T) {
	s := dnstest.New(t,
		"mta-sts.example.com. 300 IN CNAME mta-sts.hosted.example.net.",
		"mta-sts.hosted.example.net. 300 IN A 127.0.0.1")
	port := listen(t)
	c, err := newResolver(t, s).Dialer(nil, 2*time.Second)(t.Context(), "tcp", net.JoinHostPort("mta-sts.example.com", port))
	dialed(t, c, err, "127.0.0.1")
}

// TestDialerErrorsSayWhatFailed: every address that refused is in the
// error; a name without addresses says so; NXDOMAIN stays NotFound.
func TestDialerErrorsSayWhatFailed(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(l.Addr().String())
	l.Close() // nothing listens there now: connections are refused
	s := dnstest.New(t,
		"two.example.com. 300 IN A 127.0.0.1",
		"two.example.com. 300 IN A 127.0.0.2",
		"noaddr.example.com. 300 IN TXT \"no address here\"")
	dial := newResolver(t, s).Dialer(nil, 2*time.Second)

	_, err = dial(t.Context(), "tcp", net.JoinHostPort("two.example.com", port))
	if err == nil || !strings.Contains(err.Error(), "127.0.0.1:"+port) || !strings.Contains(err.Error(), "127.0.0.2:"+port) {
		t.Errorf("err = %v, want both refused addresses named", err)
	}
	_, err = dial(t.Context(), "tcp", "noaddr.example.com:443")
	if err == nil || !strings.Contains(err.Error(), "noaddr.example.com has no addresses") {
		t.Errorf("err = %v, want it to say the host has no addresses", err)
	}
	_, err = dial(t.Context(), "tcp", "missing.example.com:443")
	if !IsNotFound(err) {
		t.Errorf("err = %v, want NotFound", err)
	}
	var e *Error
	if !errors.As(err, &e) {
		t.Errorf("err = %v (%T), want a *resolve.Error", err, err)
	}
}
