package smtpin

import (
	"bufio"
	"crypto/tls"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// The tests in this file pin the go-smtp v0.25.1 weaknesses that smtpin
// closes in its own code (see conn): each fails against go-smtp alone.

func TestMessageOfExactlyMaxSizeAccepted(t *testing.T) {
	const limit = 1000
	e := start(t, func(o *Options) {
		o.MaxMessageSize = limit
		o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")}
	})
	// A message of n bytes, CRLF line ends, the last line dot-stuffed on
	// the wire: the dot is not part of the size (RFC 1870 §3).
	message := func(n int) string {
		body := "Subject: exact\r\n\r\n"
		for len(body)+100 <= n-4 {
			body += strings.Repeat("x", 98) + "\r\n"
		}
		return body + "." + strings.Repeat("y", n-len(body)-3) + "\r\n"
	}
	if m := message(limit); len(m) != limit {
		t.Fatalf("test message is %d bytes", len(m))
	}
	for _, tc := range []struct {
		size int
		want string
	}{{limit, "250 2.0.0"}, {limit + 1, "552 5.3.4"}} {
		t.Run("DATA "+itoa(tc.size), func(t *testing.T) {
			d := dial(t, e.srv.Addr())
			d.cmd("EHLO client.test", "250")
			d.cmd("MAIL FROM:<a@example.com>", "250")
			d.cmd("RCPT TO:<b@example.org>", "250")
			d.cmd("DATA", "354")
			d.write(strings.Replace(message(tc.size), "\r\n.", "\r\n..", 1) + ".\r\n")
			d.expect(tc.want)
			d.cmd("NOOP", "250") // the session goes on either way
		})
		t.Run("BDAT "+itoa(tc.size), func(t *testing.T) {
			d := dial(t, e.srv.Addr())
			d.cmd("EHLO client.test", "250")
			d.cmd("MAIL FROM:<a@example.com>", "250")
			d.cmd("RCPT TO:<b@example.org>", "250")
			m := message(tc.size)
			d.write("BDAT " + itoa(len(m)) + " LAST\r\n" + m)
			d.expect(tc.want)
			d.cmd("NOOP", "250")
		})
	}
	msgs := e.q.stored()
	if len(msgs) != 2 {
		t.Fatalf("queue holds %d messages, want the two of exactly %d bytes", len(msgs), limit)
	}
	for _, m := range msgs {
		if !strings.HasSuffix(m.body, message(limit)) {
			t.Errorf("stored message does not end with the one sent:\n%q", m.body)
		}
	}
}

// go-smtp answers a failed server-side handshake with "550" and reads on
// in plaintext; the session must end instead.
func TestFailedSTARTTLSHandshakeEndsSession(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
	t.Run("plaintext instead of a ClientHello", func(t *testing.T) {
		d := dial(t, e.srv.Addr())
		d.cmd("EHLO client.test", "250")
		d.cmd("STARTTLS", "220 2.0.0")
		d.write("EHLO evil.test\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n")
		d.expect("421 4.7.0")
		if !d.closed() {
			t.Fatal("connection still open after the failed handshake")
		}
	})
	t.Run("client refuses the certificate", func(t *testing.T) {
		d := dial(t, e.srv.Addr())
		d.cmd("EHLO client.test", "250")
		d.cmd("STARTTLS", "220 2.0.0")
		tc := tls.Client(d.nc, &tls.Config{ServerName: "localhost"}) // no root: fails
		tc.SetDeadline(time.Now().Add(5 * time.Second))
		if err := tc.Handshake(); err == nil {
			t.Fatal("handshake succeeded")
		}
		// What comes back is our one plaintext line, then the end.
		got, _ := io.ReadAll(io.LimitReader(d.nc, 4096))
		if strings.Contains(string(got), "250") || strings.Contains(string(got), "550") {
			t.Fatalf("after the failed handshake the server said %q", got)
		}
	})
	t.Run("commands pipelined after STARTTLS", func(t *testing.T) {
		// Buffered by go-smtp before the handshake; after its failure they
		// must not run in plaintext.
		d := dial(t, e.srv.Addr())
		d.cmd("EHLO client.test", "250")
		d.write("STARTTLS\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: x\r\n\r\nsmuggled\r\n.\r\n")
		d.expect("220 2.0.0")
		d.write("not a ClientHello\r\n")
		d.expect("421 4.7.0")
		if !d.closed() {
			t.Fatal("connection still open after the failed handshake")
		}
	})
	t.Run("STARTTLS at the end of a pipelined group", func(t *testing.T) {
		// The RSET's reply is held for the group and goes out in the
		// same write as the 220.
		d := dial(t, e.srv.Addr())
		d.cmd("EHLO client.test", "250")
		d.write("RSET\r\nSTARTTLS\r\n")
		d.expect("250 2.0.0")
		d.expect("220 2.0.0")
		d.write("EHLO evil.test\r\nMAIL FROM:<a@example.com>\r\n")
		d.expect("421 4.7.0")
		if !d.closed() {
			t.Fatal("connection still open after the failed handshake")
		}
	})
	if n := len(e.q.stored()); n != 0 {
		t.Fatalf("queue holds %d messages", n)
	}
	// The server still serves: a proper STARTTLS works.
	c := e.client(t, true)
	if err := c.Noop(); err != nil {
		t.Fatal(err)
	}
}

// trickle writes a byte of message text every interval until stop is
// closed or the connection fails, as a client that keeps a rejected
// message coming would.
func trickle(nc net.Conn, interval time.Duration, stop <-chan struct{}) <-chan error {
	done := make(chan error, 1)
	go func() {
		for {
			nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
			if _, err := nc.Write([]byte("z")); err != nil {
				done <- err
				return
			}
			select {
			case <-stop:
				done <- nil
				return
			case <-time.After(interval):
			}
		}
	}()
	return done
}

// After a rejected DATA go-smtp reads the rest of the message with no bound
// but the idle timeout, restarted by every byte: the drain gets
// DataTimeout in all.
func TestRejectedMessageDrainIsBoundedInTime(t *testing.T) {
	e := start(t, func(o *Options) {
		o.MaxMessageSize = 1000
		o.CommandTimeout = time.Minute
		o.DataTimeout = 500 * time.Millisecond
		o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")}
	})
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client.test", "250")
	d.cmd("MAIL FROM:<a@example.com>", "250")
	d.cmd("RCPT TO:<b@example.org>", "250")
	d.cmd("DATA", "354")
	// More than go-smtp's reader asks for at once (8 KiB), so that the
	// message is rejected before the trickle begins.
	d.write("Subject: big\r\n\r\n" + strings.Repeat(strings.Repeat("x", 98)+"\r\n", 200))
	stop := make(chan struct{})
	defer close(stop)
	// Each byte comes well within DataTimeout; only a bound on the whole
	// drain ends this.
	errc := trickle(d.nc, 50*time.Millisecond, stop)
	d.expect("552 5.3.4")
	if !d.closed() {
		t.Fatal("the drain of a rejected message outlived DataTimeout")
	}
	select {
	case err := <-errc:
		if err == nil {
			t.Fatal("trickle stopped by itself")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the server still reads the rejected message")
	}
	if n := len(e.q.stored()); n != 0 {
		t.Fatalf("queue holds %d messages", n)
	}
}

// flood writes data as fast as the server reads it until the connection
// fails; it returns how much went out.
func flood(nc net.Conn, data string) <-chan int64 {
	done := make(chan int64, 1)
	go func() {
		var n int64
		for {
			nc.SetWriteDeadline(time.Now().Add(10 * time.Second))
			m, err := io.WriteString(nc, data)
			n += int64(m)
			if err != nil {
				done <- n
				return
			}
		}
	}()
	return done
}

func TestRejectedMessageDrainIsBoundedInSize(t *testing.T) {
	e := start(t, func(o *Options) {
		o.MaxMessageSize = 1000
		o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")}
	})
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client.test", "250")
	d.cmd("MAIL FROM:<a@example.com>", "250")
	d.cmd("RCPT TO:<b@example.org>", "250")
	d.cmd("DATA", "354")
	sent := flood(d.nc, "Subject: endless\r\n"+strings.Repeat(strings.Repeat("x", 998)+"\r\n", 64))
	d.expect("552 5.3.4")
	if !d.closed() {
		t.Fatal("the server drains an endless message")
	}
	select {
	case n := <-sent:
		// The kernel's buffers hold some of what was written.
		if limit := e.srv.maxUnanswered + 16<<20; n > limit {
			t.Errorf("%d bytes went out before the connection closed, want at most %d", n, limit)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the server still reads the endless message")
	}
}

// A BDAT chunk go-smtp refuses itself (no MAIL) is discarded by go-smtp
// with no bound; the bound on unanswered bytes covers it.
func TestRefusedBDATChunkDiscardIsBounded(t *testing.T) {
	e := start(t, func(o *Options) {
		o.MaxMessageSize = 1000
		o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")}
	})
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client.test", "250")
	d.write("BDAT 4000000000 LAST\r\n")
	sent := flood(d.nc, strings.Repeat("MAIL FROM:<a@example.com>\r\n", 1000))
	d.expect("503 5.5.1")
	if !d.closed() {
		t.Fatal("the server discards a 4 GB chunk")
	}
	select {
	case <-sent:
	case <-time.After(10 * time.Second):
		t.Fatal("the server still reads the chunk")
	}
	if n := len(e.q.stored()); n != 0 {
		t.Fatalf("queue holds %d messages", n)
	}
}

// A rejected message whose rest arrives in time leaves the session usable.
func TestSessionGoesOnAfterRejectedMessageIsDrained(t *testing.T) {
	e := start(t, func(o *Options) {
		o.MaxMessageSize = 1000
		o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")}
	})
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client.test", "250")
	d.cmd("MAIL FROM:<a@example.com>", "250")
	d.cmd("RCPT TO:<b@example.org>", "250")
	d.cmd("DATA", "354")
	// Twice the limit: rejected, drained, answered.
	d.write("Subject: big\r\n\r\n" + strings.Repeat(strings.Repeat("x", 98)+"\r\n", 20) + ".\r\n")
	d.expect("552 5.3.4")
	d.cmd("MAIL FROM:<a@example.com>", "250")
	d.cmd("RCPT TO:<b@example.org>", "250")
	d.cmd("DATA", "354")
	d.write(testMessage + ".\r\n")
	d.expect("250 2.0.0")
}

// dialFrom connects from a chosen loopback address, as another client.
func dialFrom(t *testing.T, addr net.Addr, from string) (*dialogue, error) {
	t.Helper()
	dl := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	nc, err := dl.Dial("tcp", addr.String())
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { nc.Close() })
	return &dialogue{t: t, nc: nc, r: bufio.NewReader(nc)}, nil
}

// A flood from many addresses, each under the per-IP cap, meets the total
// cap; trusted clients still get in.
func TestTotalConnectionsCapped(t *testing.T) {
	e := start(t, func(o *Options) {
		o.MaxConns = 6
		o.MaxConnsPerIP = 2
		o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.1.0/24")}
	})
	var open []*dialogue
	refused := 0
	for i := range 20 {
		d, err := dialFrom(t, e.srv.Addr(), "127.0.0."+itoa(2+i/2))
		if err != nil {
			t.Fatal(err)
		}
		r := d.reply()
		switch {
		case strings.HasPrefix(r, "220 "):
			open = append(open, d)
		case strings.HasPrefix(r, "421 4.3.2"):
			refused++
		default:
			t.Fatalf("greeting %q", r)
		}
	}
	if len(open) != 6 || refused != 14 {
		t.Fatalf("%d connections admitted, %d refused; want 6 and 14", len(open), refused)
	}
	// A trusted client is let in while the server is full.
	tr, err := dialFrom(t, e.srv.Addr(), "127.0.1.1")
	if err != nil {
		t.Fatal(err)
	}
	tr.expect("220 ")
	tr.cmd("EHLO trusted.test", "250")
	tr.cmd("MAIL FROM:<a@example.com>", "250")
	// The trusted client counts: two must leave to free a slot.
	open[0].cmd("QUIT", "221")
	open[1].cmd("QUIT", "221")
	waitFor(t, func() bool { return e.srv.connCount() == 5 })
	d, err := dialFrom(t, e.srv.Addr(), "127.0.0.200")
	if err != nil {
		t.Fatal(err)
	}
	d.expect("220 ")
}

func TestNewDefaultsMaxConns(t *testing.T) {
	s, err := New(Options{Hostname: "relay.test", Listen: "127.0.0.1:0"}, &memQueue{})
	if err != nil {
		t.Fatal(err)
	}
	if s.opts.MaxConns != DefaultMaxConns {
		t.Fatalf("MaxConns = %d, want %d", s.opts.MaxConns, DefaultMaxConns)
	}
}
