package world

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"
)

// Sink is the SMTP server on every MX address: it offers STARTTLS with a
// certificate for the MX name the client asks for (SNI), accepts every
// recipient and counts what arrives.
type Sink struct {
	srv   *smtp.Server
	addrs []string // where it listens

	conns      atomic.Int64
	handshakes atomic.Int64
	resumed    atomic.Int64

	mu       sync.Mutex
	want     int // recipients; 0 = no one waits
	count    Count
	done     chan struct{}
	doneOnce bool
}

// Count is what arrived since the last Reset.
type Count struct {
	Recipients int   // recipients in accepted transactions
	Messages   int   // accepted transactions (one per message and domain)
	Plaintext  int   // of which without TLS
	Bytes      int64 // message bytes received
	// Connections and TLS handshakes at the sink, and how many of the
	// handshakes resumed an earlier TLS session.
	Conns, Handshakes, Resumed int64
	First, Last                time.Time // first and last accepted transaction
	Arrivals                   []Arrival
}

// Arrival is one accepted transaction.
type Arrival struct {
	At         time.Time
	Recipients int
}

func startSink(addrs []string, certs *certStore) (*Sink, error) {
	var ls []net.Listener
	for _, a := range addrs {
		l, err := net.Listen("tcp", a)
		if err != nil {
			for _, l := range ls {
				l.Close()
			}
			return nil, err
		}
		ls = append(ls, l)
	}
	return serveSink(ls, certs), nil
}

// serveSink runs the sink on listeners already bound.
func serveSink(ls []net.Listener, certs *certStore) *Sink {
	k := &Sink{done: make(chan struct{})}
	s := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		_, isTLS := c.TLSConnectionState()
		return &sinkSession{sink: k, tls: isTLS}, nil
	}))
	s.Domain = "sink.bench.example"
	s.MaxMessageBytes = 64 << 20
	s.MaxRecipients = 1000
	s.ReadTimeout = 2 * time.Minute
	s.WriteTimeout = 2 * time.Minute
	s.ErrorLog = log.New(io.Discard, "", 0)
	// Replies to a pipelined MAIL and RCPTs go out with the reply that
	// ends the group (RFC 2920 §3.2), as Postfix's smtpd and most MX
	// hosts send them, not one write each.
	s.GroupPipelinedReplies = true
	s.TLSConfig = &tls.Config{
		GetCertificate: certs.get,
		MinVersion:     tls.VersionTLS12,
		VerifyConnection: func(cs tls.ConnectionState) error {
			k.handshakes.Add(1)
			if cs.DidResume {
				k.resumed.Add(1)
			}
			return nil
		},
	}
	k.srv = s
	for _, l := range ls {
		k.addrs = append(k.addrs, l.Addr().String())
		go s.Serve(countingListener{l, &k.conns})
	}
	return k
}

// Reset zeroes the counts and arms Wait for want recipients (0: call
// Expect later).
func (k *Sink) Reset(want int) {
	k.conns.Store(0)
	k.handshakes.Store(0)
	k.resumed.Store(0)
	k.mu.Lock()
	defer k.mu.Unlock()
	k.want = want
	k.count = Count{}
	k.done = make(chan struct{})
	k.doneOnce = false
}

// Expect arms Wait for want recipients; Wait returns at once if they
// have already arrived.
func (k *Sink) Expect(want int) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.want = want
	if want > 0 && k.count.Recipients >= want && !k.doneOnce {
		k.doneOnce = true
		close(k.done)
	}
}

// Wait returns the counts once want recipients have arrived, or what
// arrived so far with ctx's error.
func (k *Sink) Wait(ctx context.Context) (Count, error) {
	k.mu.Lock()
	done := k.done
	k.mu.Unlock()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
	}
	return k.Snapshot(), err
}

// Snapshot returns the counts so far.
func (k *Sink) Snapshot() Count {
	k.mu.Lock()
	c := k.count
	c.Arrivals = append([]Arrival(nil), k.count.Arrivals...)
	k.mu.Unlock()
	c.Conns, c.Handshakes, c.Resumed = k.conns.Load(), k.handshakes.Load(), k.resumed.Load()
	return c
}

func (k *Sink) arrived(rcpts int, n int64, isTLS bool) {
	now := time.Now()
	k.mu.Lock()
	defer k.mu.Unlock()
	c := &k.count
	if c.Messages == 0 {
		c.First = now
	}
	c.Last = now
	c.Messages++
	c.Recipients += rcpts
	c.Bytes += n
	if !isTLS {
		c.Plaintext++
	}
	c.Arrivals = append(c.Arrivals, Arrival{At: now, Recipients: rcpts})
	if k.want > 0 && c.Recipients >= k.want && !k.doneOnce {
		k.doneOnce = true
		close(k.done)
	}
}

func (k *Sink) close() error {
	err := k.srv.Close()
	if errors.Is(err, smtp.ErrServerClosed) {
		return nil
	}
	return err
}

type sinkSession struct {
	sink  *Sink
	tls   bool
	rcpts int
}

func (s *sinkSession) Reset()        { s.rcpts = 0 }
func (s *sinkSession) Logout() error { return nil }
func (s *sinkSession) Mail(string, *smtp.MailOptions) error {
	s.rcpts = 0
	return nil
}
func (s *sinkSession) Rcpt(string, *smtp.RcptOptions) error {
	s.rcpts++
	return nil
}
func (s *sinkSession) Data(r io.Reader) error {
	n, err := io.Copy(io.Discard, r)
	if err != nil {
		return err
	}
	s.sink.arrived(s.rcpts, n, s.tls)
	return nil
}

// countingListener counts accepted connections.
type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}
