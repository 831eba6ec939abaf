package smtpin

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/internal/testpki"
	"github.com/stsrelay/stsrelay/queue"
)

// holdDeliverer never delivers: the benchmark measures acceptance only.
type holdDeliverer struct{}

func (holdDeliverer) Deliver(ctx context.Context, job *queue.Job) []queue.Status {
	<-ctx.Done()
	return nil
}

// BenchmarkAccept sends 4 KiB messages over one loopback session from a
// trusted network into a real queue (not running deliveries): the accept
// path from MAIL FROM to the 250 after the commit.
//
//	go test -run '^$' -bench Accept -benchmem -memprofile mem.out ./smtpin/
func BenchmarkAccept(b *testing.B) {
	dir := b.TempDir()
	db, err := queue.OpenDB(filepath.Join(dir, "stsrelay.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	discard := slog.New(slog.NewTextHandler(io.Discard, nil))
	q, err := queue.New(db, queue.Options{Deliverer: holdDeliverer{}, Hostname: "relay.test", Logger: discard})
	if err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	ca := testpki.NewCA(b)
	cert := ca.Issue(b, "localhost", "127.0.0.1")
	srv, err := New(Options{
		Hostname:        "relay.test",
		Listen:          "127.0.0.1:0",
		GetCertificate:  func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &cert, nil },
		TrustedNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")},
		Logger:          discard,
	}, q)
	if err != nil {
		b.Fatal(err)
	}
	if err := srv.Listen(); err != nil {
		b.Fatal(err)
	}
	go srv.Serve()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}()
	c, err := smtp.Dial(srv.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if err := c.Hello("client.test"); err != nil {
		b.Fatal(err)
	}
	var msg bytes.Buffer
	msg.WriteString("From: app@example.com\r\nTo: rcpt@example.org\r\nSubject: benchmark\r\nMessage-ID: <bench@example.com>\r\nDate: Sat, 5 Dec 2026 12:00:00 +0000\r\n\r\n")
	line := strings.Repeat("x", 76) + "\r\n"
	for msg.Len() < 4096 {
		msg.WriteString(line)
	}
	b.SetBytes(int64(msg.Len()))
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if err := c.Mail("app@example.com", nil); err != nil {
			b.Fatal(err)
		}
		if err := c.Rcpt("rcpt@example.org", nil); err != nil {
			b.Fatal(err)
		}
		w, err := c.Data()
		if err != nil {
			b.Fatal(err)
		}
		if _, err := w.Write(msg.Bytes()); err != nil {
			b.Fatal(err)
		}
		if err := w.Close(); err != nil {
			b.Fatal(err)
		}
	}
}

// benchMessage is a message of about size bytes: a short header section
// and lines of 78 characters, as go-smtp hands DATA over (no final dot).
func benchMessage(size int) []byte {
	var msg bytes.Buffer
	msg.WriteString("From: app@example.com\r\nTo: rcpt@example.org\r\nSubject: benchmark\r\nMessage-ID: <bench@example.com>\r\nDate: Sat, 5 Dec 2026 12:00:00 +0000\r\n\r\n")
	line := strings.Repeat("x", 76) + "\r\n"
	for msg.Len() < size {
		msg.WriteString(line)
	}
	return msg.Bytes()
}

var benchSizes = []struct {
	name string
	size int
}{{"4KiB", 4 << 10}, {"100KiB", 100 << 10}}

// BenchmarkBodyReader: the checks on the message text alone, read in the
// 8 KiB reads of the bufio.Reader in receive.
func BenchmarkBodyReader(b *testing.B) {
	for _, bs := range benchSizes {
		b.Run(bs.name, func(b *testing.B) {
			msg := benchMessage(bs.size)
			buf := make([]byte, 8192)
			src := bytes.NewReader(msg)
			b.SetBytes(int64(len(msg)))
			b.ReportAllocs()
			for b.Loop() {
				src.Reset(msg)
				body := bodyReader{r: src, maxLine: maxTextLine, max: 1 << 30}
				for {
					if _, err := body.Read(buf); err != nil {
						if err != io.EOF {
							b.Fatal(err)
						}
						break
					}
				}
			}
		})
	}
}

// BenchmarkReceive: session.receive from the message text go-smtp hands
// over to the queue id, with a queue that reads the message and keeps
// nothing: the CPU and allocations of our accept path, without the disk
// and without the SMTP dialogue.
func BenchmarkReceive(b *testing.B) {
	for _, bs := range benchSizes {
		b.Run(bs.name, func(b *testing.B) {
			discard := slog.New(slog.NewTextHandler(io.Discard, nil))
			srv, err := New(Options{Hostname: "relay.test", Listen: "127.0.0.1:0", Logger: discard}, &countQueue{})
			if err != nil {
				b.Fatal(err)
			}
			s := &session{srv: srv, client: netip.MustParseAddr("127.0.0.1"), log: discard}
			tx := transaction{helo: "client.test", extended: true, env: queue.Envelope{From: "app@example.com", ClientAddr: "127.0.0.1",
				Recipients: []queue.RecipientParams{{Addr: "rcpt@example.org"}}}}
			msg := benchMessage(bs.size)
			src := bytes.NewReader(msg)
			b.SetBytes(int64(len(msg)))
			b.ReportAllocs()
			for b.Loop() {
				src.Reset(msg)
				if e, ok := s.receive(tx, src).(*smtp.SMTPError); !ok || e.Code != 250 {
					b.Fatal(e)
				}
			}
		})
	}
}

// BenchmarkAuthFailureUnderSpray: one failed AUTH recorded while the
// limiter is full of clients that failed once each, the state a password
// spray from many addresses keeps it in.
func BenchmarkAuthFailureUnderSpray(b *testing.B) {
	l := newAuthLimiter(DefaultAuthFailures, DefaultAuthFailuresPerIP, DefaultAuthFailuresPer)
	i := 0
	for ; len(l.m) < authLimiterSize-1; i++ {
		l.failed(sprayClient(i), "admin")
	}
	b.ReportAllocs()
	for b.Loop() {
		l.failed(sprayClient(i), "admin")
		i++
	}
}
