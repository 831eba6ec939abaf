package delivery

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// An attempt the queue cuts off (a stop, or an operator's bounce, delete
// or hold cancels its context) records no deferral (queue.applyOutcome),
// so whatever it still sends is a copy the queue does not know of: after
// the cut it opens no session, new or idle, to the same host or the next.

var errBounced = errors.New("bounced by the mail system administrator")

// lineProxy forwards each connection to upstream, calling seen with every
// line the client sends before passing it on. Once seen returns true, the
// connection's replies no longer reach the client: it waits for them
// until the cut closes its end.
func lineProxy(t *testing.T, upstream string, seen func(line string) (mute bool)) string {
	return rawServer(t, func(c net.Conn) {
		up, err := net.Dial("tcp", upstream)
		if err != nil {
			return
		}
		defer up.Close()
		var muted atomic.Bool
		go func() {
			buf := make([]byte, 4096)
			for {
				n, err := up.Read(buf)
				if n > 0 && !muted.Load() {
					c.Write(buf[:n])
				}
				if err != nil {
					return
				}
			}
		}()
		r := bufio.NewReader(c)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			if seen(line) {
				muted.Store(true)
			}
			io.WriteString(up, line)
		}
	})
}

// dialsAfter wraps the test dialer: it lists the addresses dialled once
// ctx is done.
type dialsAfter struct {
	v   *testEnv
	ctx context.Context
	mu  sync.Mutex
	got []string
}

func (d *dialsAfter) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if d.ctx.Err() != nil {
		d.mu.Lock()
		d.got = append(d.got, addr)
		d.mu.Unlock()
	}
	return d.v.dial(ctx, network, addr)
}

func (d *dialsAfter) list() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.got)
}

// idleSessions counts the connections in e's idle cache.
func idleSessions(e *Engine) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	n := 0
	for _, l := range e.idle {
		n += len(l)
	}
	return n
}

// A session that reached MAILMAX leaves the rest to a new session; cut off
// as the first says QUIT, the attempt opens none, and the rest say why.
func TestCutOffAttemptOpensNoNewSessionForTheRest(t *testing.T) {
	v, mx := oneMX(t, func(s *smtpServer) {
		s.MaxRecipients = 1
		s.Limits = []string{"MAILMAX=1"}
	})
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	var once sync.Once
	v.route("127.0.0.2", lineProxy(t, mx.Addr, func(line string) bool {
		if strings.HasPrefix(line, "QUIT") {
			// QUIT waits for its reply, so the cut comes before the
			// attempt goes on.
			once.Do(func() { cancel(errBounced) })
		}
		return false
	}))
	d := &dialsAfter{v: v, ctx: ctx}
	e := v.engine(func(o *Options) { o.DialContext = d.dial })
	st := e.Deliver(ctx, testJob("example.test", "a@example.test", "b@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	wantStatus(t, st[1], 451, "4.4.2", "mx1.example.test: delivery interrupted before a new session (bounced by the mail system administrator)")
	if got := d.list(); len(got) > 0 {
		t.Errorf("dialled %q after the cut", got)
	}
	if got := transactions(mx); !slices.EqualFunc(got, [][]string{{"a@example.test"}}, slices.Equal) {
		t.Errorf("mx took %q, want a@ alone", got)
	}
}

// The same with an idle connection to the host in the cache, left by
// another message while the first session said QUIT: the cut-off attempt
// does not take it, and it stays for others.
func TestCutOffAttemptTakesNoIdleConnectionForTheRest(t *testing.T) {
	v, mx := oneMX(t, func(s *smtpServer) {
		s.MaxRecipients = 1
		s.Limits = []string{"MAILMAX=2"}
	})
	e := v.engine(func(o *Options) { o.IdleTimeout = time.Minute })
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	var mu sync.Mutex
	var afterCut []string
	var once sync.Once
	v.route("127.0.0.2", lineProxy(t, mx.Addr, func(line string) bool {
		if ctx.Err() != nil {
			mu.Lock()
			afterCut = append(afterCut, strings.TrimSpace(line))
			mu.Unlock()
		}
		if strings.HasPrefix(line, "QUIT") {
			once.Do(func() {
				other, stop := context.WithTimeout(context.Background(), 10*time.Second)
				defer stop()
				if st := e.Deliver(other, testJob("example.test", "y@example.test")); !st[0].Delivered() {
					t.Errorf("the other message: %s", st[0].String())
				}
				cancel(errBounced)
			})
		}
		return false
	}))
	// An idle connection with one transaction of MAILMAX's two left: the
	// attempt's first session.
	wantStatus(t, deliver(t, e, testJob("example.test", "p@example.test"))[0], 250, "2.0.0")
	st := e.Deliver(ctx, testJob("example.test", "a@example.test", "b@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	wantStatus(t, st[1], 451, "4.4.2", "delivery interrupted before a new session (bounced by the mail system administrator)")
	if n := idleSessions(e); n != 1 {
		t.Errorf("%d idle connections after the cut-off attempt, want 1 (the other message's)", n)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(afterCut) > 0 {
		t.Errorf("commands sent after the cut: %q", afterCut)
	}
	for _, m := range mx.messages() {
		if slices.Contains(m.rcpts, "b@example.test") {
			t.Errorf("b@ got the message after the cut")
		}
	}
}

// Cut off while the primary reads the envelope, the attempt does not take
// the recipient to the backup, neither on an idle connection nor on a new
// one, whether or not the destination's rate limit makes it wait.
func TestCutOffAttemptGoesToNoOtherHost(t *testing.T) {
	for _, rate := range []float64{0, 1000} {
		name := "no rate limit"
		if rate > 0 {
			name = "rate limit"
		}
		t.Run(name, func(t *testing.T) {
			v, _, mx2 := twoMX(t)
			ctx, cancel := context.WithCancelCause(context.Background())
			defer cancel(nil)
			d := &dialsAfter{v: v, ctx: ctx}
			e := v.engine(func(o *Options) {
				o.IdleTimeout = time.Minute
				o.DialContext = d.dial
				if rate > 0 {
					o.Limits = []Limit{{Domains: []string{"example.test"}, Shaping: Shaping{Rate: 1000}}}
				}
			})
			// An idle connection to mx2, left while mx1 hung up at once.
			v.route("127.0.0.2", rawServer(t, func(net.Conn) {}))
			wantStatus(t, deliver(t, e, testJob("example.test", "p@example.test"))[0], 250, "2.0.0", "mx2.example.test")
			// mx1 reads the envelope; the operator bounces the message
			// before it answers.
			v.route("127.0.0.2", rawServer(t, func(c net.Conn) {
				r := bufio.NewReader(c)
				io.WriteString(c, "220 mx1.test ESMTP\r\n")
				r.ReadString('\n') // EHLO
				io.WriteString(c, "250-mx1.test\r\n250 PIPELINING\r\n")
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if strings.HasPrefix(line, "DATA") {
						cancel(errBounced)
					}
				}
			}))
			st := e.Deliver(ctx, testJob("example.test", "b@example.test"))
			wantStatus(t, st[0], 451, "4.4.2", "mx1.example.test[127.0.0.2]: delivery interrupted after MAIL (bounced by the mail system administrator)")
			if n := idleSessions(e); n != 1 {
				t.Errorf("%d idle connections after the cut-off attempt, want mx2's", n)
			}
			if got := d.list(); len(got) > 0 {
				t.Errorf("dialled %q after the cut", got)
			}
			for _, m := range mx2.messages() {
				if slices.Contains(m.rcpts, "b@example.test") {
					t.Errorf("b@ got the message at mx2 after the cut")
				}
			}
			want := `hosts_not_used="mx2.example.test: delivery interrupted `
			if logs := v.logs.String(); !strings.Contains(logs, want) {
				t.Errorf("the log line does not say why mx2 was not used (%s):\n%s", want, logs)
			}
		})
	}
}

// connect itself, once ctx is done, dials nothing and takes no idle
// connection: it stays in the cache for other deliveries.
func TestConnectWhenCutOffDialsNoneAndLeavesTheIdleConnection(t *testing.T) {
	for _, idle := range []bool{true, false} {
		name := "no idle connection"
		if idle {
			name = "an idle connection"
		}
		t.Run(name, func(t *testing.T) {
			v, _ := oneMX(t)
			ctx, cancel := context.WithCancelCause(context.Background())
			d := &dialsAfter{v: v, ctx: ctx}
			e := v.engine(func(o *Options) {
				o.DialContext = d.dial
				if idle {
					o.IdleTimeout = time.Minute
				}
			})
			job := testJob("example.test", "a@example.test")
			wantStatus(t, deliver(t, e, job)[0], 250, "2.0.0")
			nh := e.nexthop("example.test", job.Envelope.From)
			p := e.plan(context.Background(), nh)
			if p.status != nil || len(p.hops) != 1 {
				t.Fatalf("plan: %+v", p)
			}
			cancel(errBounced)
			budget := MaxConnectionsPerAttempt
			s, fs := e.connect(ctx, nh, p.hops[0], p.effective(0, job.Envelope), false, &budget)
			if s != nil {
				t.Fatalf("connect handed over a session (reused %v) after the cut", s.reused)
			}
			if len(fs) != 1 || !strings.Contains(fs[0].status.Text, "delivery interrupted connecting (bounced by the mail system administrator)") {
				t.Errorf("failures %+v, want one that names the cut", fs)
			}
			if budget != MaxConnectionsPerAttempt {
				t.Errorf("%d connections left of the attempt's %d, want none spent", budget, MaxConnectionsPerAttempt)
			}
			if got := d.list(); len(got) > 0 {
				t.Errorf("dialled %q after the cut", got)
			}
			if n, want := idleSessions(e), map[bool]int{true: 1, false: 0}[idle]; n != want {
				t.Errorf("%d idle connections, want %d", n, want)
			}
		})
	}
}

// On a connection from the idle cache, RSET leads the group. Its reply
// lost to the cut's own close is no sign of a connection the remote
// dropped while idle: the group went out (over BDAT with the whole
// message, which the remote may store), so the recipient is cut off
// there and then, not sent again on another connection or to the next
// host.
func TestRSETReplyLostToTheCutIsNoStaleConnection(t *testing.T) {
	for _, tc := range []struct {
		name   string
		opt    func(*Options)
		copies int // what mx1 stores of b@'s message
	}{
		{"BDAT", func(*Options) {}, 1},
		{"DATA", noChunking, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, mx1, mx2 := twoMX(t)
			ctx, cancel := context.WithCancelCause(context.Background())
			defer cancel(nil)
			v.route("127.0.0.2", lineProxy(t, mx1.Addr, func(line string) bool {
				if !strings.HasPrefix(line, "RSET") {
					return false
				}
				// The cut comes before the remote has read RSET, and the
				// group's replies never reach the engine.
				cancel(errBounced)
				return true
			}))
			d := &dialsAfter{v: v, ctx: ctx}
			e := v.engine(tc.opt, func(o *Options) {
				o.IdleTimeout = time.Minute
				o.DialContext = d.dial
			})
			wantStatus(t, deliver(t, e, testJob("example.test", "p@example.test"))[0], 250, "2.0.0", "mx1.example.test")
			st := e.Deliver(ctx, testJob("example.test", "b@example.test"))
			wantStatus(t, st[0], 451, "4.4.2", "mx1.example.test[127.0.0.2]: delivery interrupted after RSET (bounced by the mail system administrator)")
			if got := d.list(); len(got) > 0 {
				t.Errorf("dialled %q after the cut", got)
			}
			if n := len(mx2.messages()); n != 0 {
				t.Errorf("mx2 got %d messages", n)
			}
			copies := func() int {
				n := 0
				for _, m := range mx1.messages() {
					if slices.Contains(m.rcpts, "b@example.test") {
						n++
					}
				}
				return n
			}
			if tc.copies > 0 {
				// The remote read the whole group and stores the message:
				// the copy the cut came too late to stop.
				waitFor(t, "mx1 to store b@'s message", func() bool { return copies() >= tc.copies })
			}
			if n := copies(); n != tc.copies {
				t.Errorf("mx1 stored %d copies for b@, want %d", n, tc.copies)
			}
			if logs := v.logs.String(); !strings.Contains(logs, "reused=true") {
				t.Errorf("the log line does not describe the reused connection:\n%s", logs)
			}
		})
	}
}

// cutKey holds, in the context of a delivery, the function that cuts it
// off (cutAfterReply).
type cutKey struct{}

// cutAfterReply makes its cut, once set, when the engine has read the
// last line of a 250 reply: for the attempt that opens it, the reply to
// EHLO, the last read of opening a session.
type cutAfterReply struct {
	net.Conn
	cut    func()
	seen   strings.Builder
	done   bool // the cut was made
	once   sync.Once
	closed chan struct{}
}

func (c *cutAfterReply) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.seen.Write(b[:n])
	if c.cut != nil && !c.done && strings.Contains(c.seen.String(), "250 ") {
		c.done = true
		c.cut()
	}
	return n, err
}

func (c *cutAfterReply) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// cutDialer wraps every connection of the test dialer in cutAfterReply,
// with the cut of the attempt's context, if it has one.
func cutDialer(v *testEnv) func(context.Context, string, string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := v.dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		cut, _ := ctx.Value(cutKey{}).(func())
		return &cutAfterReply{Conn: c, cut: cut, closed: make(chan struct{})}, nil
	}
}

// cachedCut counts the sessions in e's idle cache whose connection a cut
// has closed, and those it holds.
func cachedCut(t *testing.T, e *Engine) (cut, cached int) {
	t.Helper()
	e.mu.Lock()
	var all []*session
	for _, l := range e.idle {
		all = append(all, l...)
	}
	e.mu.Unlock()
	for _, s := range all {
		if c, ok := s.conn.Conn.(*cutAfterReply); ok && c.done {
			// The cut was made during the session's own reads: its
			// AfterFunc has closed the connection, or is about to.
			select {
			case <-c.closed:
			case <-time.After(5 * time.Second):
				t.Fatalf("a connection cut off was not closed")
			}
			cut++
		}
	}
	return cut, len(all)
}

// A cut that comes after a new session's last read, before it is handed
// over, closes its connection: the session must not go to the idle cache
// as though unused, where the next message would find it dead, as many
// times as it may retry a stale connection, and be deferred.
func TestCutWhileOpeningLeavesNoClosedConnectionInTheCache(t *testing.T) {
	v, mx := oneMX(t)
	e := v.engine(func(o *Options) {
		o.IdleTimeout = time.Minute
		o.DialContext = cutDialer(v)
	})
	var wg, ready sync.WaitGroup
	ready.Add(maxStaleRetries + 1)
	for i := range maxStaleRetries + 1 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithCancelCause(context.Background())
			defer cancel(nil)
			ctx = context.WithValue(ctx, cutKey{}, func() {
				ready.Done() // all have dialled before any is cut
				ready.Wait()
				cancel(errBounced)
			})
			st := e.Deliver(ctx, testJob("example.test", fmt.Sprintf("cut%d@example.test", i)))
			wantStatus(t, st[0], 451, "4.4.2", "mx1.example.test[127.0.0.2]: delivery interrupted", "(bounced by the mail system administrator)")
		}()
	}
	wg.Wait()
	if cut, cached := cachedCut(t, e); cut > 0 {
		t.Errorf("the idle cache holds %d sessions whose connection the cut closed (of %d)", cut, cached)
	}
	// Each connection's slot was given back, once.
	e.mu.Lock()
	open := 0
	for _, d := range e.dests {
		open += d.open
	}
	e.mu.Unlock()
	if _, cached := cachedCut(t, e); open != cached {
		t.Errorf("%d connections counted open, with %d in the idle cache and none busy", open, cached)
	}
	st := deliver(t, e, testJob("example.test", "b@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if n := len(mx.messages()); n != 1 {
		t.Errorf("mx got %d messages, want 1", n)
	}
}

// The same for an idle connection to a remote without PIPELINING, which
// RSET checks before it is handed over: a cut after the reply has closed
// it, and it must not go back to the cache.
func TestCutAfterTheIdleConnectionsRSETLeavesItOutOfTheCache(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2")
	mx := &scriptMX{ehlo: []string{"8BITMIME"}}
	v.route("127.0.0.2", newScriptMX(t, mx))
	e := v.engine(func(o *Options) {
		o.IdleTimeout = time.Minute
		o.DialContext = cutDialer(v)
	})
	wantStatus(t, deliver(t, e, testJob("example.test", "p@example.test"))[0], 250, "2.0.0")
	e.mu.Lock()
	var idle []*session
	for _, l := range e.idle {
		idle = append(idle, l...)
	}
	e.mu.Unlock()
	if len(idle) != 1 {
		t.Fatalf("%d idle connections, want 1", len(idle))
	}
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	c := idle[0].conn.Conn.(*cutAfterReply)
	c.seen.Reset()
	c.cut = func() { cancel(errBounced) } // on the reply to RSET
	st := e.Deliver(ctx, testJob("example.test", "b@example.test"))
	wantStatus(t, st[0], 451, "4.4.2", "delivery interrupted", "(bounced by the mail system administrator)")
	if !c.done {
		t.Fatalf("no cut made: commands %q", mx.commands())
	}
	if cut, cached := cachedCut(t, e); cut > 0 {
		t.Errorf("the idle cache holds %d sessions whose connection the cut closed (of %d)", cut, cached)
	}
	wantStatus(t, deliver(t, e, testJob("example.test", "c@example.test"))[0], 250, "2.0.0")
	if got := mx.messages(); len(got) != 2 {
		t.Errorf("mx took %q, want p@'s and c@'s messages", got)
	}
}
