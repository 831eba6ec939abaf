package load

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/internal/testpki"
)

// server is a go-smtp server that records every message.
type server struct {
	mu    sync.Mutex
	msgs  []msg
	conns int
	auths int
	// stall holds up the answer to the first DATA this long.
	stall time.Duration
}

type msg struct {
	from string
	to   []string
	data []byte
	tls  bool
}

func startServer(t *testing.T, cert *tls.Certificate) (string, *server) {
	t.Helper()
	k := &server{}
	s := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		_, isTLS := c.TLSConnectionState()
		return &session{k: k, tls: isTLS}, nil
	}))
	s.Domain = "relay.test"
	s.AllowInsecureAuth = false
	if cert != nil {
		s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{*cert}}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(countConns{l, k})
	t.Cleanup(func() { s.Close() })
	return l.Addr().String(), k
}

type countConns struct {
	net.Listener
	k *server
}

func (l countConns) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.k.mu.Lock()
		l.k.conns++
		l.k.mu.Unlock()
	}
	return c, err
}

type session struct {
	k    *server
	tls  bool
	auth bool
	m    msg
}

func (s *session) AuthMechanisms() []string { return []string{sasl.Plain} }
func (s *session) Auth(string) (sasl.Server, error) {
	return sasl.NewPlainServer(func(_, user, pass string) error {
		if user != "app" || pass != "secret" {
			return errors.New("bad credentials")
		}
		s.auth = true
		s.k.mu.Lock()
		s.k.auths++
		s.k.mu.Unlock()
		return nil
	}), nil
}
func (s *session) Reset()        { s.m = msg{} }
func (s *session) Logout() error { return nil }
func (s *session) Mail(from string, _ *smtp.MailOptions) error {
	s.m = msg{from: from, tls: s.tls}
	return nil
}
func (s *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	s.m.to = append(s.m.to, to)
	return nil
}
func (s *session) Data(r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	s.m.data = b
	s.k.mu.Lock()
	s.k.msgs = append(s.k.msgs, s.m)
	first := len(s.k.msgs) == 1
	s.k.mu.Unlock()
	if first {
		time.Sleep(s.k.stall)
	}
	return nil
}

// A slow start (the first message waits a second) is in Latencies and not
// in Steady, which holds the messages begun after the warm-up.
func TestSteadyLeavesOutTheWarmup(t *testing.T) {
	addr, k := startServer(t, nil)
	k.stall = time.Second
	res, err := Run(context.Background(), Options{
		Addr: addr, Messages: 10, Size: 1024, Recipients: 1,
		Domains: []string{"a.example"}, Sessions: 1, RunID: "t", Warmup: 500 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Accepted != 10 || len(res.Latencies) != 10 {
		t.Fatalf("%d accepted, %d latencies; want 10", res.Accepted, len(res.Latencies))
	}
	if got := res.Percentile(100); got < time.Second {
		t.Errorf("slowest latency %v, want the first message's stall of 1s", got)
	}
	if len(res.Steady) != 9 {
		t.Fatalf("%d steady latencies, want the 9 messages begun after the stall", len(res.Steady))
	}
	if got := res.SteadyPercentile(100); got >= time.Second {
		t.Errorf("slowest steady latency %v: the stalled first message is in it", got)
	}
	noWarmup, err := Run(context.Background(), Options{
		Addr: addr, Messages: 3, Size: 1024, Recipients: 1,
		Domains: []string{"a.example"}, Sessions: 1, RunID: "u",
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(noWarmup.Steady) != 0 || noWarmup.SteadyPercentile(99) != 0 {
		t.Errorf("Steady = %v without a Warmup, want none", noWarmup.Steady)
	}
}

func TestRunSubmitsEveryMessageWithItsRecipientsAndSize(t *testing.T) {
	addr, k := startServer(t, nil)
	domains := []string{"a.example", "b.example", "c.example", "d.example"}
	res, err := Run(context.Background(), Options{
		Addr: addr, Messages: 50, Size: 4096, Recipients: 5, DomainsPerMessage: 3,
		Domains: domains, Sessions: 4, RunID: "t",
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Accepted != 50 || res.Failed != 0 || res.Recipients != 250 || len(res.Latencies) != 50 {
		t.Fatalf("result = %d accepted, %d failed (%s), %d recipients, %d latencies", res.Accepted, res.Failed, res.FirstError, res.Recipients, len(res.Latencies))
	}
	if k.conns != 4 {
		t.Errorf("%d connections for 4 kept sessions", k.conns)
	}
	seen := map[string]bool{}
	for _, m := range k.msgs {
		// SMTP adds nothing: the message as sent is Size bytes, CRLF-ended.
		if len(m.data) != 4096 || !bytes.HasSuffix(m.data, []byte("\r\n")) {
			t.Fatalf("message of %d bytes, want 4096 ending in CRLF", len(m.data))
		}
		if len(m.to) != 5 {
			t.Fatalf("%d recipients, want 5", len(m.to))
		}
		doms := map[string]bool{}
		for _, r := range m.to {
			_, d, _ := strings.Cut(r, "@")
			doms[d] = true
		}
		if len(doms) != 3 {
			t.Errorf("recipients %v span %d domains, want 3", m.to, len(doms))
		}
		id := string(m.data[bytes.Index(m.data, []byte("Message-ID:")):][:30])
		if seen[id] {
			t.Errorf("Message-ID used twice: %s", id)
		}
		seen[id] = true
	}
}

func TestRunWithSTARTTLSAndAUTHPerMessage(t *testing.T) {
	ca := testpki.NewCA(t)
	cert := ca.Issue(t, "relay.test")
	addr, k := startServer(t, &cert)
	res, err := Run(context.Background(), Options{
		Addr: addr, Messages: 12, Size: 1000, Recipients: 1, Domains: []string{"a.example"},
		Sessions: 3, ConnPerMessage: true,
		TLS:  &tls.Config{RootCAs: ca.Pool, ServerName: "relay.test"},
		User: "app", Password: "secret",
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Accepted != 12 || res.Failed != 0 {
		t.Fatalf("%d accepted, %d failed: %s", res.Accepted, res.Failed, res.FirstError)
	}
	if k.conns != 12 || k.auths != 12 {
		t.Errorf("%d connections and %d AUTHs for 12 messages, want one each per message", k.conns, k.auths)
	}
	for _, m := range k.msgs {
		if !m.tls {
			t.Fatal("a message went without TLS")
		}
	}
}

func TestRunCountsRefusedMessages(t *testing.T) {
	ca := testpki.NewCA(t)
	cert := ca.Issue(t, "relay.test")
	addr, _ := startServer(t, &cert)
	res, err := Run(context.Background(), Options{
		Addr: addr, Messages: 5, Size: 500, Recipients: 1, Domains: []string{"a.example"}, Sessions: 1,
		TLS:  &tls.Config{RootCAs: ca.Pool, ServerName: "relay.test"},
		User: "app", Password: "wrong", MaxConsecutiveErrors: 100,
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Accepted != 0 || res.Failed != 5 || !strings.Contains(res.FirstError, "AUTH") {
		t.Fatalf("%d accepted, %d failed, first error %q; want 5 AUTH failures", res.Accepted, res.Failed, res.FirstError)
	}
}

func TestMessagesHaveNoBareCROrLFWhateverTheCut(t *testing.T) {
	for size := 400; size < 600; size++ {
		g := &generator{o: Options{Size: size, From: "a@bench.example", RunID: "run"}, filler: filler(size)}
		var buf bytes.Buffer
		for i := range 120 { // Message-IDs of 1 to 3 digits move the cut
			g.message(&buf, i, []string{"u@a.example"})
			b := buf.Bytes()
			if len(b) != size {
				t.Fatalf("size %d, message %d: %d bytes", size, i, len(b))
			}
			for j, c := range b {
				if c == '\r' && (j+1 == len(b) || b[j+1] != '\n') || c == '\n' && (j == 0 || b[j-1] != '\r') {
					t.Fatalf("size %d, message %d: bare CR or LF at byte %d", size, i, j)
				}
			}
			if !bytes.HasSuffix(b, []byte("\r\n")) {
				t.Fatalf("size %d, message %d does not end in CRLF", size, i)
			}
		}
	}
}
