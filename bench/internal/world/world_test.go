package world

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/miekg/dns"
)

// The parts run on random loopback ports here; Start puts them on the
// fixed addresses, which needs root.

func TestDNSAnswersLikeACachingResolver(t *testing.T) {
	s, err := startDNS("127.0.0.1:0", zone(3))
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	c := new(dns.Client)
	ask := func(name string, qtype uint16) *dns.Msg {
		t.Helper()
		m := new(dns.Msg)
		m.SetQuestion(dns.Fqdn(name), qtype)
		m.SetEdns0(1232, true)
		r, _, err := c.Exchange(m, s.addr)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		return r
	}
	r := ask("Enforce002.example", dns.TypeMX)
	if len(r.Answer) != 1 || r.Answer[0].(*dns.MX).Mx != "mx.enforce002.example." || r.Rcode != dns.RcodeSuccess {
		t.Fatalf("MX enforce002 = %v", r)
	}
	if r.Answer[0].Header().Name != "Enforce002.example." {
		t.Errorf("owner %q does not echo the question's case", r.Answer[0].Header().Name)
	}
	if r := ask("mx.plain003.example", dns.TypeA); len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != "127.0.26.3" {
		t.Fatalf("A mx.plain003 = %v", r)
	}
	if r := ask("_mta-sts.enforce001.example", dns.TypeTXT); len(r.Answer) != 1 || !strings.Contains(r.Answer[0].String(), "v=STSv1; id="+PolicyID) {
		t.Fatalf("TXT _mta-sts.enforce001 = %v", r)
	}
	if r := ask("_mta-sts.plain001.example", dns.TypeTXT); r.Rcode != dns.RcodeNameError || len(r.Ns) != 1 {
		t.Fatalf("TXT _mta-sts.plain001 = %v, want NXDOMAIN with SOA", r)
	}
	if r := ask("mx.enforce001.example", dns.TypeAAAA); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 0 {
		t.Fatalf("AAAA mx.enforce001 = %v, want no data", r)
	}
	if r := ask("enforce004.example", dns.TypeMX); r.Rcode != dns.RcodeNameError {
		t.Fatalf("MX enforce004 (beyond 3 domains) = %v, want NXDOMAIN", r)
	}
	if r := ask(DeferDomain, dns.TypeMX); len(r.Answer) != 1 {
		t.Fatalf("MX %s = %v", DeferDomain, r)
	}
}

func TestPolicyHostServesEachDomainItsEnforcePolicy(t *testing.T) {
	ca, certs := testCerts(t, 2)
	p, err := startPolicy("127.0.0.1:0", certs, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer p.close()
	get := func(host, path string) (int, string) {
		t.Helper()
		c := http.Client{Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: ca.Pool},
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return (&net.Dialer{}).DialContext(ctx, "tcp", p.addr)
			},
		}}
		resp, err := c.Get("https://" + host + path)
		if err != nil {
			t.Fatalf("%s: %v", host, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	code, body := get("mta-sts.enforce002.example", "/.well-known/mta-sts.txt")
	if code != 200 || !strings.Contains(body, "mode: enforce\n") || !strings.Contains(body, "mx: mx.enforce002.example\n") {
		t.Fatalf("policy of enforce002: %d %q", code, body)
	}
	if code, _ := get("mta-sts.enforce001.example", "/mta-sts.txt"); code != 404 {
		t.Fatalf("another path: %d, want 404", code)
	}
}

func TestSinkCountsWhatArrivesAndWakesTheWaiter(t *testing.T) {
	ca, certs := testCerts(t, 1)
	k, err := startSink([]string{"127.0.0.1:0"}, certs)
	if err != nil {
		t.Fatal(err)
	}
	defer k.close()
	k.Reset(0)

	send := func(rcpts ...string) {
		t.Helper()
		conn, err := net.Dial("tcp", k.addrs[0])
		if err != nil {
			t.Fatal(err)
		}
		// The name checked is the MX name, as an MTA-STS sender checks it.
		c, err := smtp.NewClientStartTLS(conn, &tls.Config{RootCAs: ca.Pool, ServerName: MXHost(Domain(Enforce, 1))})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.SendMail("a@bench.example", rcpts, strings.NewReader("Subject: x\r\n\r\nbody\r\n")); err != nil {
			t.Fatal(err)
		}
		c.Quit()
	}
	send("u1@enforce001.example", "u2@enforce001.example")
	k.Expect(3)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	if c, err := k.Wait(ctx); err == nil {
		t.Fatalf("Wait returned with %d of 3 recipients", c.Recipients)
	}
	cancel()
	send("u3@enforce001.example")
	c, err := k.Wait(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if c.Recipients != 3 || c.Messages != 2 || c.Plaintext != 0 || c.Conns != 2 || c.Handshakes != 2 || len(c.Arrivals) != 2 {
		t.Fatalf("count = %+v", c)
	}
	if c.First.After(c.Last) {
		t.Errorf("first arrival %v after last %v", c.First, c.Last)
	}
}

// The sink answers a pipelined group in one write, as Postfix does: a
// relay reading it sees all the replies in one read.
func TestSinkGroupsRepliesToPipelinedCommands(t *testing.T) {
	_, certs := testCerts(t, 1)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var writes atomic.Int64
	k := serveSink([]net.Listener{writeCounter{l, &writes}}, certs)
	defer k.close()
	conn, err := net.Dial("tcp", k.addrs[0])
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(conn)
	readReply := func() {
		t.Helper()
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				t.Fatal(err)
			}
			if len(line) < 4 || line[3] != '-' {
				return
			}
		}
	}
	readReply() // banner
	fmt.Fprintf(conn, "EHLO client.test\r\n")
	readReply()
	before := writes.Load()
	fmt.Fprintf(conn, "MAIL FROM:<a@bench.example>\r\nRCPT TO:<u1@enforce001.example>\r\nNOOP\r\n")
	for range 3 {
		readReply()
	}
	if n := writes.Load() - before; n != 1 {
		t.Errorf("the sink answered a pipelined MAIL, RCPT, NOOP in %d writes, want 1", n)
	}
}

// writeCounter counts the writes on the connections it accepts.
type writeCounter struct {
	net.Listener
	n *atomic.Int64
}

func (l writeCounter) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	return countedConn{c, l.n}, err
}

type countedConn struct {
	net.Conn
	n *atomic.Int64
}

func (c countedConn) Write(b []byte) (int, error) {
	c.n.Add(1)
	return c.Conn.Write(b)
}

// testCerts makes a CA and the certificates of the first n domains.
func testCerts(t *testing.T, n int) (*CA, *certStore) {
	t.Helper()
	ca, err := NewCA()
	if err != nil {
		t.Fatal(err)
	}
	certs, err := newCertStore(ca, n)
	if err != nil {
		t.Fatal(err)
	}
	return ca, certs
}
