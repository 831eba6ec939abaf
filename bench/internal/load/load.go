// Package load submits a fixed number of messages over SMTP to a relay,
// as applications do: C concurrent sessions, plain or STARTTLS, optional
// AUTH PLAIN, one connection per session or one per message. It measures
// how fast the relay accepts them and how long each acceptance takes.
package load

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// Options describe one load.
type Options struct {
	Addr     string // the relay's submission address, host:port
	Messages int
	Size     int // bytes per message, headers included
	// Recipients per message, spread over DomainsPerMessage consecutive
	// domains of Domains (message i starts at domain i*DomainsPerMessage).
	Recipients        int
	DomainsPerMessage int
	Domains           []string
	Sessions          int // concurrent SMTP sessions
	// ConnPerMessage opens a new connection (EHLO, STARTTLS, AUTH) for
	// every message instead of keeping one per session.
	ConnPerMessage bool
	// TLS, when set, makes every session use STARTTLS with this config.
	TLS                  *tls.Config
	User, Password       string // AUTH PLAIN when User is set
	From                 string
	RunID                string        // goes into Message-IDs, to tell runs apart
	Timeout              time.Duration // per SMTP command; default 2 minutes
	MaxConsecutiveErrors int           // a session gives up after this many; default 20
	// Warmup: messages begun this long after the start also go into
	// Result.Steady, the latencies once a cold start is behind.
	Warmup time.Duration
}

// Result is what one load measured.
type Result struct {
	Start      time.Time // before the first connection
	End        time.Time // the last 250 after DATA
	Accepted   int       // messages acknowledged with 250
	Recipients int       // recipients of the accepted messages
	Failed     int       // messages refused or cut off
	FirstError string    // the first failure, for the report
	// Latencies of accepted messages, sorted: from MAIL FROM to the 250
	// after DATA on a kept connection; from connect to that 250 when every
	// message has its own connection.
	Latencies []time.Duration
	// Steady is the sorted latencies of the messages begun Options.Warmup
	// or later after Start (none when Warmup is 0).
	Steady []time.Duration
}

// Rate is accepted messages per second from Start to End.
func (r *Result) Rate() float64 {
	d := r.End.Sub(r.Start).Seconds()
	if d <= 0 {
		return 0
	}
	return float64(r.Accepted) / d
}

// Percentile returns the p-th percentile (0..100) of the latencies.
func (r *Result) Percentile(p float64) time.Duration { return percentile(r.Latencies, p) }

// SteadyPercentile is Percentile of Steady.
func (r *Result) SteadyPercentile(p float64) time.Duration { return percentile(r.Steady, p) }

func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(float64(len(sorted)-1)*p/100 + 0.5)
	return sorted[i]
}

// Run submits the messages and returns when every session is done.
func Run(ctx context.Context, o Options) (*Result, error) {
	if o.Messages <= 0 || o.Sessions <= 0 || o.Recipients <= 0 || len(o.Domains) == 0 {
		return nil, errors.New("load: messages, sessions, recipients and domains must be positive")
	}
	if o.DomainsPerMessage <= 0 {
		o.DomainsPerMessage = 1
	}
	if o.DomainsPerMessage > o.Recipients || o.DomainsPerMessage > len(o.Domains) {
		return nil, fmt.Errorf("load: %d domains per message for %d recipients and %d domains", o.DomainsPerMessage, o.Recipients, len(o.Domains))
	}
	if o.Timeout == 0 {
		o.Timeout = 2 * time.Minute
	}
	if o.MaxConsecutiveErrors == 0 {
		o.MaxConsecutiveErrors = 20
	}
	if o.From == "" {
		o.From = "app@bench.example"
	}
	res := &Result{Start: time.Now()}
	g := &generator{o: o, filler: filler(o.Size), steadyFrom: res.Start.Add(o.Warmup)}
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		next atomic.Int64
	)
	for range o.Sessions {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s := g.session(ctx, &next)
			mu.Lock()
			defer mu.Unlock()
			res.Accepted += s.accepted
			res.Recipients += s.recipients
			res.Failed += s.failed
			res.Latencies = append(res.Latencies, s.latencies...)
			res.Steady = append(res.Steady, s.steady...)
			if s.lastAck.After(res.End) {
				res.End = s.lastAck
			}
			if res.FirstError == "" && s.firstErr != nil {
				res.FirstError = s.firstErr.Error()
			}
		}()
	}
	wg.Wait()
	slices.Sort(res.Latencies)
	slices.Sort(res.Steady)
	return res, ctx.Err()
}

type generator struct {
	o          Options
	filler     []byte    // body lines, cut to size after the headers
	steadyFrom time.Time // messages begun from here on are in Steady too
}

type sessionResult struct {
	accepted, recipients, failed int
	latencies, steady            []time.Duration
	lastAck                      time.Time
	firstErr                     error
}

// session submits messages until none are left: the next index comes from
// next, shared by all sessions.
func (g *generator) session(ctx context.Context, next *atomic.Int64) *sessionResult {
	s := &sessionResult{}
	var c *smtp.Client
	defer func() {
		if c != nil {
			c.Quit()
		}
	}()
	var buf bytes.Buffer
	consecutive := 0
	for ctx.Err() == nil {
		i := int(next.Add(1)) - 1
		if i >= g.o.Messages {
			return s
		}
		start := time.Now()
		if c == nil {
			var err error
			if c, err = g.connect(ctx); err != nil {
				s.fail(err)
				if consecutive++; consecutive >= g.o.MaxConsecutiveErrors {
					return s
				}
				continue
			}
			if !g.o.ConnPerMessage {
				start = time.Now() // a kept connection's set-up is not any message's latency
			}
		}
		rcpts := g.recipients(i)
		g.message(&buf, i, rcpts)
		if err := send(c, g.o.From, rcpts, buf.Bytes()); err != nil {
			s.fail(err)
			c.Close()
			c = nil
			if consecutive++; consecutive >= g.o.MaxConsecutiveErrors {
				return s
			}
			continue
		}
		consecutive = 0
		now := time.Now()
		s.accepted++
		s.recipients += len(rcpts)
		s.latencies = append(s.latencies, now.Sub(start))
		if g.o.Warmup > 0 && !start.Before(g.steadyFrom) {
			s.steady = append(s.steady, now.Sub(start))
		}
		s.lastAck = now
		if g.o.ConnPerMessage {
			c.Quit()
			c = nil
		}
	}
	return s
}

func (s *sessionResult) fail(err error) {
	s.failed++
	if s.firstErr == nil {
		s.firstErr = err
	}
}

// connect dials, says EHLO, and does STARTTLS and AUTH as configured.
func (g *generator) connect(ctx context.Context) (*smtp.Client, error) {
	d := net.Dialer{Timeout: g.o.Timeout}
	conn, err := d.DialContext(ctx, "tcp", g.o.Addr)
	if err != nil {
		return nil, err
	}
	conn.SetDeadline(time.Now().Add(g.o.Timeout))
	var c *smtp.Client
	if g.o.TLS != nil {
		if c, err = smtp.NewClientStartTLS(conn, g.o.TLS); err != nil {
			return nil, fmt.Errorf("STARTTLS: %w", err)
		}
	} else {
		c = smtp.NewClient(conn)
		if err := c.Hello("loadgen.bench.example"); err != nil {
			c.Close()
			return nil, err
		}
	}
	c.CommandTimeout = g.o.Timeout
	c.SubmissionTimeout = g.o.Timeout
	if g.o.User != "" {
		if err := c.Auth(sasl.NewPlainClient("", g.o.User, g.o.Password)); err != nil {
			c.Close()
			return nil, fmt.Errorf("AUTH: %w", err)
		}
	}
	conn.SetDeadline(time.Time{})
	return c, nil
}

func send(c *smtp.Client, from string, rcpts []string, msg []byte) error {
	if err := c.Mail(from, nil); err != nil {
		return fmt.Errorf("MAIL: %w", err)
	}
	for _, r := range rcpts {
		if err := c.Rcpt(r, nil); err != nil {
			return fmt.Errorf("RCPT: %w", err)
		}
	}
	w, err := c.Data()
	if err != nil {
		return fmt.Errorf("DATA: %w", err)
	}
	if _, err := w.Write(msg); err != nil {
		return fmt.Errorf("DATA: %w", err)
	}
	if err := w.Close(); err != nil {
		return fmt.Errorf("end of DATA: %w", err)
	}
	return nil
}

// recipients of message i: Recipients addresses spread as evenly as
// possible over DomainsPerMessage consecutive domains.
func (g *generator) recipients(i int) []string {
	o := g.o
	out := make([]string, 0, o.Recipients)
	for r := range o.Recipients {
		d := o.Domains[(i*o.DomainsPerMessage+r%o.DomainsPerMessage)%len(o.Domains)]
		out = append(out, "user"+strconv.Itoa(i)+"."+strconv.Itoa(r)+"@"+d)
	}
	return out
}

// message writes message i into buf: headers, then body lines up to Size.
func (g *generator) message(buf *bytes.Buffer, i int, rcpts []string) {
	buf.Reset()
	fmt.Fprintf(buf, "From: <%s>\r\nTo: <%s>\r\nSubject: bench message %d\r\nDate: %s\r\nMessage-ID: <%d.%s@bench.example>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n",
		g.o.From, rcpts[0], i, time.Now().Format(time.RFC1123Z), i, g.o.RunID)
	// Filler up to Size, ending on CRLF so that the relay adds nothing;
	// where the cut falls inside a CRLF, no bare CR may remain (RFC 5321
	// §2.3.8).
	if rest := g.o.Size - buf.Len() - 2; rest > 0 {
		buf.Write(g.filler[:rest])
		if b := buf.Bytes(); b[len(b)-1] == '\r' {
			b[len(b)-1] = 'x'
		}
	}
	buf.WriteString("\r\n")
}

// filler is n bytes of 76-character lines, like a base64 attachment.
func filler(n int) []byte {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
	b := make([]byte, 0, n+78)
	for len(b) < n {
		for j := range 76 {
			b = append(b, alphabet[(len(b)+j*7)%len(alphabet)])
		}
		b = append(b, '\r', '\n')
	}
	return b
}
