package delivery

import (
	"context"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/internal/testpki"
	"github.com/stsrelay/stsrelay/policy"
)

// fiveRecipients is a job for a@ to e@example.test.
func fiveRecipients() []string {
	return []string{"a@example.test", "b@example.test", "c@example.test", "d@example.test", "e@example.test"}
}

// RFC 9422 §4.1: a remote that says LIMITS MAILMAX=n takes at most n
// transactions per session. The session that has carried them is closed,
// not cached, and the next message opens another.
func TestMAILMAXClosesTheSessionAfterItsTransactions(t *testing.T) {
	for _, withSTARTTLS := range []bool{false, true} {
		t.Run(fmt.Sprintf("STARTTLS %v", withSTARTTLS), func(t *testing.T) {
			opts := []mxOption{func(s *smtpServer) { s.Limits = []string{"MAILMAX=2"} }}
			if withSTARTTLS {
				opts = append(opts, withTLS(testpki.NewCA(t).Issue(t, "mx1.example.test")))
			}
			v, mx := oneMX(t, opts...)
			e := v.engine(func(o *Options) { o.IdleTimeout = time.Minute })
			for i := range 5 {
				if st := deliver(t, e, testJob("example.test", fmt.Sprintf("r%d@example.test", i))); !st[0].Delivered() {
					t.Fatalf("message %d: %s", i, st[0].String())
				}
			}
			m := mx.messages()
			if len(m) != 5 || m[0].tls != withSTARTTLS {
				t.Errorf("%d messages received (TLS %v), want 5", len(m), len(m) > 0 && m[0].tls)
			}
			if n := mx.mostMails(); n > 2 {
				t.Errorf("a session carried %d MAIL commands, want at most MAILMAX=2", n)
			}
			if n := mx.sessionCount(); n != 3 {
				t.Errorf("%d sessions for 5 messages at 2 per session, want 3", n)
			}
		})
	}
}

// The EHLO after STARTTLS is the one that counts (RFC 3207 §4.2): its
// MAILMAX applies, not the one said before.
func TestMAILMAXIsReadFromTheEHLOAfterSTARTTLS(t *testing.T) {
	v, _ := oneMX(t)
	cert := v.ca.Issue(t, "mx1.example.test")
	mx := &scriptMX{ehlo: []string{"PIPELINING", "LIMITS MAILMAX=1"}, ehloTLS: []string{"PIPELINING", "LIMITS MAILMAX=3"}, cert: &cert}
	v.route("127.0.0.2", newScriptMX(t, mx))
	e := v.engine(func(o *Options) { o.IdleTimeout = time.Minute })
	for i := range 5 {
		if st := deliver(t, e, testJob("example.test", fmt.Sprintf("r%d@example.test", i))); !st[0].Delivered() {
			t.Fatalf("message %d: %s", i, st[0].String())
		}
	}
	verbs := strings.Join(mx.verbs(), " ")
	if n := strings.Count(verbs, "STARTTLS"); n != 2 || len(mx.messages()) != 5 {
		t.Errorf("%d messages over %d sessions, want 5 over 2 (MAILMAX=3): %s", len(mx.messages()), n, verbs)
	}
}

// A job split into transactions (RCPTMAX) that reaches MAILMAX sends no
// further MAIL on that session: the recipients not yet sent go in a new
// session to the same host, within the same attempt.
func TestMAILMAXSplitJobGoesOnInANewSession(t *testing.T) {
	v, mx := oneMX(t, func(s *smtpServer) {
		s.MaxRecipients = 2 // LIMITS RCPTMAX=2
		s.Limits = []string{"MAILMAX=2"}
	})
	e := v.engine()
	for i, st := range deliver(t, e, testJob("example.test", fiveRecipients()...)) {
		if !st.Delivered() {
			t.Errorf("recipient %d: %s", i, st.String())
		}
	}
	want := [][]string{{"a@example.test", "b@example.test"}, {"c@example.test", "d@example.test"}, {"e@example.test"}}
	if got := transactions(mx); !slices.EqualFunc(got, want, slices.Equal) {
		t.Errorf("transactions %q, want %q", got, want)
	}
	if n := mx.mostMails(); n > 2 {
		t.Errorf("a session carried %d MAIL commands, want at most MAILMAX=2", n)
	}
	if n := mx.sessionCount(); n != 2 {
		t.Errorf("%d sessions, want 2", n)
	}
}

// The new sessions a split job opens count toward the connections one
// attempt may open (MaxConnectionsPerAttempt); the recipients left when they run
// out wait with a status that says why, whichever limit ended the last
// session.
func TestTransactionLimitDefersWhatTheAttemptsSessionsCannotCarry(t *testing.T) {
	for _, tc := range []struct {
		name   string
		limits []string
		shape  Shaping
		want   string
	}{
		{"MAILMAX", []string{"MAILMAX=2"}, Shaping{},
			"mx1.example.test[127.0.0.2]: the remote's MAILMAX of 2 transactions per session was reached; the rest go in a new session"},
		{"max_messages_per_connection", nil, Shaping{MaxMessagesPerConn: 2},
			"mx1.example.test[127.0.0.2]: max_messages_per_connection of 2 transactions was reached; the rest go in a new session"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, mx := oneMX(t, func(s *smtpServer) {
				s.MaxRecipients = 1
				s.Limits = tc.limits
			})
			e := v.engine(func(o *Options) {
				if tc.shape != (Shaping{}) {
					o.Limits = []Limit{{Domains: []string{"example.test"}, Shaping: tc.shape}}
				}
			})
			var rcpts []string
			for i := range 2*MaxConnectionsPerAttempt + 5 {
				rcpts = append(rcpts, fmt.Sprintf("r%02d@example.test", i))
			}
			st := deliver(t, e, testJob("example.test", rcpts...))
			for i, s := range st {
				if i < 2*MaxConnectionsPerAttempt {
					if !s.Delivered() {
						t.Errorf("recipient %d: %s", i, s.String())
					}
					continue
				}
				wantStatus(t, s, 452, "4.5.3", tc.want)
			}
			if n := mx.mostMails(); n > 2 {
				t.Errorf("a session carried %d MAIL commands, want at most 2", n)
			}
			if n, m := mx.sessionCount(), len(mx.messages()); n != MaxConnectionsPerAttempt || m != 2*MaxConnectionsPerAttempt {
				t.Errorf("%d transactions over %d sessions, want %d over %d", m, n, 2*MaxConnectionsPerAttempt, MaxConnectionsPerAttempt)
			}
		})
	}
}

// max_messages_per_connection counts transactions, not jobs: a job split
// into three takes three of them, and the smaller of it and the remote's
// MAILMAX applies.
func TestMaxMessagesPerConnectionCountsTransactions(t *testing.T) {
	for _, tc := range []struct {
		name    string
		perConn int
		limits  []string
	}{
		{"max_messages_per_connection 2", 2, nil},
		{"max_messages_per_connection 2, MAILMAX 3", 2, []string{"MAILMAX=3"}},
		{"max_messages_per_connection 3, MAILMAX 2", 3, []string{"MAILMAX=2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, mx := oneMX(t, func(s *smtpServer) {
				s.MaxRecipients = 2
				s.Limits = tc.limits
			})
			e := v.engine(func(o *Options) {
				o.IdleTimeout = time.Minute
				o.Limits = []Limit{{Domains: []string{"example.test"}, Shaping: Shaping{MaxMessagesPerConn: tc.perConn}}}
			})
			// Two transactions on the first session, one on the second;
			// the next message is the second's second, the last opens a
			// third.
			for i, st := range deliver(t, e, testJob("example.test", fiveRecipients()...)) {
				if !st.Delivered() {
					t.Errorf("recipient %d: %s", i, st.String())
				}
			}
			for _, r := range []string{"f@example.test", "g@example.test"} {
				if st := deliver(t, e, testJob("example.test", r)); !st[0].Delivered() {
					t.Errorf("%s: %s", r, st[0].String())
				}
			}
			if n := mx.mostMails(); n != 2 {
				t.Errorf("at most %d MAIL commands on a session, want 2", n)
			}
			if n, m := mx.sessionCount(), len(mx.messages()); n != 3 || m != 5 {
				t.Errorf("%d transactions over %d sessions, want 5 over 3", m, n)
			}
		})
	}
}

// RFC 9422 §3.7: a LIMITS parameter that is malformed is ignored, and the
// remote gets as many transactions per session as one without it. A
// well-formed one is read whatever its case.
func TestMalformedMAILMAXIsIgnored(t *testing.T) {
	for _, tc := range []struct {
		param    string
		sessions int
	}{
		{"MAILMAX=abc", 1},
		{"MAILMAX=0", 1},
		{"MAILMAX=99999999", 1},
		{"MAILMAX=-1", 1},
		{"MAILMAX=", 1},
		{"MAILMAX", 1},
		{"MAILMAX=2x", 1},
		{"mailmax=2", 3}, // well-formed
	} {
		t.Run(tc.param, func(t *testing.T) {
			v, mx := oneMX(t, func(s *smtpServer) { s.Limits = []string{tc.param} })
			e := v.engine(func(o *Options) { o.IdleTimeout = time.Minute })
			for i := range 5 {
				if st := deliver(t, e, testJob("example.test", fmt.Sprintf("r%d@example.test", i))); !st[0].Delivered() {
					t.Fatalf("message %d: %s", i, st[0].String())
				}
			}
			if n := mx.sessionCount(); n != tc.sessions {
				t.Errorf("%d sessions for 5 messages, want %d", n, tc.sessions)
			}
		})
	}
}

// RFC 9422 §3.7: limits not known, and known ones with a malformed value,
// are ignored; names are read in any case.
func TestParseLimitsIgnoresWhatItCannotRead(t *testing.T) {
	for _, tc := range []struct {
		params string
		want   limits
	}{
		{"", limits{}},
		{"RCPTMAX=2", limits{rcptMax: 2}},
		{"rcptmax=2 RCPTDOMAINMAX=1 FUTUREMAX=9", limits{rcptMax: 2}},
		{"RCPTMAX=999999", limits{rcptMax: 999999}},
		{"RCPTMAX=abc RCPTMAX=0 RCPTMAX=9999999 RCPTMAX=-1 RCPTMAX= RCPTMAX RCPTMAX=2x", limits{}},
		{"RCPTMAX=abc RCPTMAX=3 RCPTMAX=4", limits{rcptMax: 3}},
		{"MAILMAX=1000 rcptmax=2 RCPTDOMAINMAX=1", limits{mailMax: 1000, rcptMax: 2}},
		{"mailmax=2", limits{mailMax: 2}},
		{"MAILMAX=abc MAILMAX=0 MAILMAX=99999999 MAILMAX=-1 MAILMAX= MAILMAX MAILMAX=2x", limits{}},
		{"MAILMAX=99999999 RCPTMAX=2", limits{rcptMax: 2}},
	} {
		if got := parseLimits(tc.params); got != tc.want {
			t.Errorf("parseLimits(%q) = %+v, want %+v", tc.params, got, tc.want)
		}
	}
}

// While a new session with the same host takes the recipients a session
// could not carry, what the host deferred waits, then goes to the next
// host with whatever the new session defers; when the host gives no new
// session, the rest go there too.
func TestTransactionLimitKeepsTheNextHostForWhatTheHostDeferred(t *testing.T) {
	for _, tc := range []struct {
		name     string
		again    bool // mx1 takes a new connection
		mx1, mx2 [][]string
		deferred string
		eBy      string // who delivered e@
	}{
		{"new session", true,
			[][]string{{"a@example.test", "b@example.test"}, {"d@example.test"}, {"e@example.test"}},
			[][]string{{"c@example.test"}},
			"(1 of 5 recipients)", "mx1.example.test[127.0.0.2]"},
		{"no new session", false,
			[][]string{{"a@example.test", "b@example.test"}, {"d@example.test"}},
			[][]string{{"c@example.test", "e@example.test"}},
			"(1 of 5 recipients); mx1.example.test[127.0.0.2]: connection refused (1 of 5 recipients not sent)",
			"mx2.example.test[127.0.0.3]"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, mx1, mx2 := twoMX(t, func(s *smtpServer) { s.MaxRecipients = 2 })
			mx1.rcptErr["c@example.test"] = smtpErr(451, smtp.EnhancedCode{4, 7, 1}, "greylisted, try later")
			if !tc.again {
				// Once its first session has carried two messages, mx1
				// refuses connections.
				mx1.dataHook = func(*smtp.Conn) {
					if len(mx1.messages()) == 1 {
						v.route("127.0.0.2", v.closed)
					}
				}
			}
			e := v.engine(func(o *Options) {
				o.Limits = []Limit{{Domains: []string{"example.test"}, Shaping: Shaping{MaxMessagesPerConn: 2}}}
			})
			st := deliver(t, e, testJob("example.test", fiveRecipients()...))
			for i, s := range st {
				if !s.Delivered() {
					t.Errorf("recipient %d: %s", i, s.String())
				}
			}
			wantStatus(t, st[2], 250, "2.0.0", "mx2.example.test[127.0.0.3]")
			wantStatus(t, st[4], 250, "2.0.0", tc.eBy)
			if got := transactions(mx1); !slices.EqualFunc(got, tc.mx1, slices.Equal) {
				t.Errorf("mx1 took %q, want %q", got, tc.mx1)
			}
			if got := transactions(mx2); !slices.EqualFunc(got, tc.mx2, slices.Equal) {
				t.Errorf("mx2 took %q, want %q", got, tc.mx2)
			}
			if n := mx1.mostMails(); n > 2 {
				t.Errorf("a session with mx1 carried %d MAIL commands, want at most 2", n)
			}
			want := `earlier_hosts="mx1.example.test[127.0.0.2]: 451 4.7.1 greylisted, try later ` + tc.deferred + `"`
			if logs := v.logs.String(); !strings.Contains(logs, want) || !strings.Contains(logs, "mx=mx2.example.test") {
				t.Errorf("log line does not say mx1 deferred (%s), then mx2:\n%s", want, logs)
			}
		})
	}
}

// When the new session for the rest cannot be had, they say why, for the
// retry schedule, and the next host's log line says they went on unsent,
// not that the host deferred them.
func TestRestWithoutANewSessionSaysWhy(t *testing.T) {
	for _, next := range []bool{false, true} {
		name := "no next host"
		if next {
			name = "next host"
		}
		t.Run(name, func(t *testing.T) {
			var v *testEnv
			var mx1 *testMX
			opt := func(s *smtpServer) { s.MaxRecipients = 2 }
			if next {
				v, mx1, _ = twoMX(t, opt)
			} else {
				v, mx1 = oneMX(t, opt)
			}
			// Once its first session has carried two messages, mx1 hangs
			// up on new connections.
			hangUp := rawServer(t, func(net.Conn) {})
			mx1.dataHook = func(*smtp.Conn) {
				if len(mx1.messages()) == 1 {
					v.route("127.0.0.2", hangUp)
				}
			}
			e := v.engine(func(o *Options) {
				o.Limits = []Limit{{Domains: []string{"example.test"}, Shaping: Shaping{MaxMessagesPerConn: 2}}}
			})
			st := deliver(t, e, testJob("example.test", fiveRecipients()...))
			for i, s := range st[:4] {
				if !s.Delivered() {
					t.Errorf("recipient %d: %s", i, s.String())
				}
			}
			logs := v.logs.String()
			if !next {
				wantStatus(t, st[4], 451, "4.4.2", "mx1.example.test[127.0.0.2]: connection lost waiting for the greeting")
				return
			}
			wantStatus(t, st[4], 250, "2.0.0", "mx2.example.test[127.0.0.3]")
			want := `earlier_hosts="mx1.example.test[127.0.0.2]: connection lost waiting for the greeting (1 of 5 recipients not sent)"`
			if !strings.Contains(logs, want) {
				t.Errorf("log line does not say the rest went on unsent (%s):\n%s", want, logs)
			}
		})
	}
}

// New sessions with a host that reached its transaction limit leave one
// of the attempt's connections for each host after it: with a session per
// transaction and more recipients than the attempt has connections, what
// the primary deferred still reaches the backup, with the rest the
// primary's sessions could not carry.
func TestTransactionLimitKeepsAConnectionForTheNextHost(t *testing.T) {
	for _, tc := range []struct {
		name   string
		limits []string
		shape  Shaping
	}{
		{"max_messages_per_connection", nil, Shaping{MaxMessagesPerConn: 1}},
		{"MAILMAX", []string{"MAILMAX=1"}, Shaping{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, mx1, mx2 := twoMX(t, func(s *smtpServer) {
				s.MaxRecipients = 1
				s.Limits = tc.limits
			})
			mx1.rcptErr["a@example.test"] = smtpErr(451, smtp.EnhancedCode{4, 7, 1}, "greylisted, try later")
			e := v.engine(func(o *Options) {
				if tc.shape != (Shaping{}) {
					o.Limits = []Limit{{Domains: []string{"example.test"}, Shaping: tc.shape}}
				}
			})
			rcpts := []string{"a@example.test"}
			for i := range MaxConnectionsPerAttempt + 2 {
				rcpts = append(rcpts, fmt.Sprintf("r%02d@example.test", i))
			}
			st := deliver(t, e, testJob("example.test", rcpts...))
			// mx1: a@ deferred, then one recipient in each of 8 more
			// sessions; mx2, with the last connection: a@ first.
			wantStatus(t, st[0], 250, "2.0.0", "mx2.example.test[127.0.0.3]")
			for i, s := range st[1:] {
				switch {
				case i < MaxConnectionsPerAttempt-2:
					wantStatus(t, s, 250, "2.0.0", "mx1.example.test[127.0.0.2]")
				default:
					wantStatus(t, s, 452, "4.5.3", "mx2.example.test[127.0.0.3]: ", "was reached; the rest go in a new session")
				}
			}
			if n1, n2 := mx1.sessionCount(), mx2.sessionCount(); n1 != MaxConnectionsPerAttempt-1 || n2 != 1 {
				t.Errorf("%d sessions with mx1 and %d with mx2, want %d and 1", n1, n2, MaxConnectionsPerAttempt-1)
			}
			if got := transactions(mx2); !slices.EqualFunc(got, [][]string{{"a@example.test"}}, slices.Equal) {
				t.Errorf("mx2 took %q, want a@ alone", got)
			}
		})
	}
}

// transactions are the recipients of each message mx took, in order.
func transactions(mx *testMX) [][]string {
	var out [][]string
	for _, m := range mx.messages() {
		out = append(out, m.rcpts)
	}
	return out
}

// A new session for the rest spends only what the hosts after it do not
// need: with the first of the primary's two addresses down, each new
// session costs two connections, and the last one kept for the backup
// must not go on the primary's second address.
func TestNewSessionForTheRestLeavesTheBackupItsConnection(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.4", // down: refused
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	opt := func(s *smtpServer) { s.MaxRecipients = 1 }
	mx1, mx2 := newMX(t, opt), newMX(t, opt)
	v.route("127.0.0.2", mx1.Addr)
	v.route("127.0.0.3", mx2.Addr)
	mx1.rcptErr["a@example.test"] = smtpErr(451, smtp.EnhancedCode{4, 7, 1}, "greylisted, try later")
	e := v.engine(func(o *Options) {
		o.Limits = []Limit{{Domains: []string{"example.test"}, Shaping: Shaping{MaxMessagesPerConn: 1}}}
	})
	rcpts := []string{"a@example.test"}
	for i := range MaxConnectionsPerAttempt {
		rcpts = append(rcpts, fmt.Sprintf("r%02d@example.test", i))
	}
	st := deliver(t, e, testJob("example.test", rcpts...))
	wantStatus(t, st[0], 250, "2.0.0", "mx2.example.test[127.0.0.3]")
	if n := mx2.sessionCount(); n != 1 {
		t.Errorf("%d sessions with mx2, want 1 (the connection kept for it)", n)
	}
	if logs := v.logs.String(); !strings.Contains(logs, "mx=mx2.example.test") {
		t.Errorf("the log line does not name mx2 as the host used:\n%s", logs)
	}
}

// The rest of a split message whose new session the host refuses for
// good (a 554 greeting; SMTPUTF8 gone, which the message needs) while
// the backup is unreachable are deferred, as a fresh attempt to the same
// two hosts would be: a refusal by one host with another merely
// unreachable is no bounce.
func TestRestRefusedANewSessionDeferWhileTheBackupIsDown(t *testing.T) {
	for _, tc := range []struct {
		name  string
		later func(t *testing.T) string // what mx1 is once it has taken a message
		says  string
	}{
		{"554 greeting", func(t *testing.T) string {
			return rawServer(t, func(c net.Conn) { io.WriteString(c, "554 5.7.1 no service for you right now\r\n") })
		}, "mx1.example.test[127.0.0.2]: 554 5.7.1 no service for you right now"},
		{"no SMTPUTF8", func(t *testing.T) string { return newMX(t).Addr },
			"mx1.example.test[127.0.0.2]: SMTPUTF8 not supported"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, mx1, _ := twoMX(t, func(s *smtpServer) {
				s.MaxRecipients = 2
				s.EnableSMTPUTF8 = true
			})
			later := tc.later(t)
			mx1.dataHook = func(*smtp.Conn) {
				if len(mx1.messages()) == 1 {
					v.route("127.0.0.2", later)
				}
			}
			v.route("127.0.0.3", v.closed) // the backup is down
			e := v.engine(func(o *Options) {
				o.Limits = []Limit{{Domains: []string{"example.test"}, Shaping: Shaping{MaxMessagesPerConn: 2}}}
			})
			job := testJob("example.test", fiveRecipients()...)
			job.Envelope.SMTPUTF8 = true
			st := deliver(t, e, job)
			for i, s := range st[:4] {
				if !s.Delivered() {
					t.Errorf("recipient %d: %s", i, s.String())
				}
			}
			job = testJob("example.test", "f@example.test")
			job.Envelope.SMTPUTF8 = true
			fresh := deliver(t, e, job)[0]
			wantStatus(t, fresh, 451, "4.4.1", tc.says, "mx2.example.test[127.0.0.3]: connection refused")
			if st[4] != fresh {
				t.Errorf("e@: %s\nwant what a fresh attempt says: %s", st[4].String(), fresh.String())
			}
		})
	}
}

// The connection kept for the host after the next is not spent by the
// next: a primary whose sessions carry one transaction each leaves two,
// one for each later host, and the second host, both of its addresses
// down, may try only one of them, so a recipient the primary greylisted
// still reaches the third.
func TestNextHostLeavesTheConnectionKeptForTheOneAfterIt(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"example.test. 300 IN MX 30 mx3.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.5", // down: refused
		"mx2.example.test. 300 IN A 127.0.0.6", // down: refused
		"mx3.example.test. 300 IN A 127.0.0.3")
	mx1 := newMX(t, func(s *smtpServer) {
		s.MaxRecipients = 1
		s.Limits = []string{"MAILMAX=1"}
	})
	mx3 := newMX(t)
	v.route("127.0.0.2", mx1.Addr)
	v.route("127.0.0.3", mx3.Addr)
	mx1.rcptErr["a@example.test"] = smtpErr(451, smtp.EnhancedCode{4, 7, 1}, "greylisted, try later")
	d := &dialCounter{v: v}
	e := v.engine(func(o *Options) { o.DialContext = d.dial })
	fresh := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, fresh[0], 250, "2.0.0", "mx3.example.test[127.0.0.3]")
	if n := d.count("127.0.0.5") + d.count("127.0.0.6"); n != 2 {
		t.Errorf("alone, a@ went to %d of mx2's addresses, want both", n)
	}

	before, mx2Before := d.total(), d.count("127.0.0.5")+d.count("127.0.0.6")
	rcpts := []string{"a@example.test"}
	for i := range MaxConnectionsPerAttempt {
		rcpts = append(rcpts, fmt.Sprintf("r%02d@example.test", i))
	}
	st := deliver(t, e, testJob("example.test", rcpts...))
	// mx1: a@ deferred, then one recipient in each of 7 more sessions;
	// mx2: one connection; mx3, with the last: a@ and the rest.
	wantStatus(t, st[0], 250, "2.0.0", "mx3.example.test[127.0.0.3]")
	for i, s := range st[1:] {
		if i < MaxConnectionsPerAttempt-3 {
			wantStatus(t, s, 250, "2.0.0", "mx1.example.test[127.0.0.2]")
		} else {
			wantStatus(t, s, 250, "2.0.0", "mx3.example.test[127.0.0.3]")
		}
	}
	if n := d.total() - before; n != MaxConnectionsPerAttempt {
		t.Errorf("%d connections, want the attempt's %d", n, MaxConnectionsPerAttempt)
	}
	if n := d.count("127.0.0.5") + d.count("127.0.0.6") - mx2Before; n != 1 {
		t.Errorf("%d connections to mx2, want 1: the other is kept for mx3", n)
	}
	if n := mx3.sessionCount(); n != 2 {
		t.Errorf("%d sessions with mx3 over both attempts, want 2", n)
	}
	lines := attemptLines(v)
	if len(lines) != 2 || !strings.Contains(lines[1], "mx=mx3.example.test") ||
		!strings.Contains(lines[1], `hosts_not_used="mx2.example.test[127.0.0.`) {
		t.Errorf("the log line does not name mx3 as the host used and mx2 as not used:\n%s", v.logs.String())
	}
}

// A new session with a host that has delivered some of the message, and
// then refuses the connection, does not make the log line say the host
// was not used: the next host's earlier_hosts says the rest went on
// unsent, and why.
func TestRefusedNewSessionIsNotAHostNotUsed(t *testing.T) {
	v, mx1, _ := twoMX(t, func(s *smtpServer) { s.MaxRecipients = 2 })
	mx1.dataHook = func(*smtp.Conn) {
		if len(mx1.messages()) == 1 {
			v.route("127.0.0.2", v.closed)
		}
	}
	e := v.engine(func(o *Options) {
		o.Limits = []Limit{{Domains: []string{"example.test"}, Shaping: Shaping{MaxMessagesPerConn: 2}}}
	})
	st := deliver(t, e, testJob("example.test", fiveRecipients()...))
	for _, s := range st[:4] {
		wantStatus(t, s, 250, "2.0.0", "mx1.example.test[127.0.0.2]")
	}
	wantStatus(t, st[4], 250, "2.0.0", "mx2.example.test[127.0.0.3]")
	logs := v.logs.String()
	if strings.Contains(logs, "hosts_not_used=") {
		t.Errorf("hosts_not_used in the log, where mx1 delivered 4 of the 5 recipients and mx2 the last:\n%s", logs)
	}
	want := `earlier_hosts="mx1.example.test[127.0.0.2]: connection refused (1 of 5 recipients not sent)"`
	if !strings.Contains(logs, want) {
		t.Errorf("the log line does not say the rest went on unsent (%s):\n%s", want, logs)
	}
}

// The rest of a split message that two hosts in turn refused a new
// session (the primary unreachable, then the backup with a 554 greeting)
// are deferred, as a fresh attempt to the same two hosts would be: the
// second refusal does not forget the first host.
func TestRestRefusedTwiceRemembersTheUnreachableFirstHost(t *testing.T) {
	v, mx1, mx2 := twoMX(t, func(s *smtpServer) { s.MaxRecipients = 1 })
	refuse554 := rawServer(t, func(c net.Conn) { io.WriteString(c, "554 5.7.1 no service for you right now\r\n") })
	mx1.dataHook = func(*smtp.Conn) {
		if len(mx1.messages()) == 0 {
			v.route("127.0.0.2", v.closed)
		}
	}
	mx2.dataHook = func(*smtp.Conn) {
		if len(mx2.messages()) == 0 {
			v.route("127.0.0.3", refuse554)
		}
	}
	e := v.engine(func(o *Options) {
		o.Limits = []Limit{{Domains: []string{"example.test"}, Shaping: Shaping{MaxMessagesPerConn: 1}}}
	})
	st := deliver(t, e, testJob("example.test", "a@example.test", "b@example.test", "c@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "mx1.example.test[127.0.0.2]")
	wantStatus(t, st[1], 250, "2.0.0", "mx2.example.test[127.0.0.3]")
	fresh := deliver(t, e, testJob("example.test", "f@example.test"))[0]
	wantStatus(t, fresh, 451, "4.4.1", "mx1.example.test[127.0.0.2]: connection refused",
		"mx2.example.test[127.0.0.3]: 554 5.7.1 no service for you right now")
	if st[2] != fresh {
		t.Errorf("c@: %s\nwant what a fresh attempt says: %s", st[2].String(), fresh.String())
	}
	lines := attemptLines(v)
	if len(lines) != 2 {
		t.Fatalf("%d attempt lines, want 2:\n%s", len(lines), v.logs.String())
	}
	want := `new_session_failed="mx1.example.test[127.0.0.2]: connection refused; mx2.example.test[127.0.0.3]: 554 5.7.1 no service for you right now"`
	if !strings.Contains(lines[0], want) || strings.Contains(lines[0], "hosts_not_used=") {
		t.Errorf("the log line does not say both new sessions failed (%s), or names a host that delivered as not used:\n%s", want, lines[0])
	}
}

// A recipient the primary deferred keeps what it said when the backup,
// which has taken part of the message, refuses a new session for good:
// the refusal answers for no recipient, and the greylisting is what the
// last host that answered for it said.
func TestRefusedNewSessionLeavesTheEarlierHostsDeferral(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	mx1 := newMX(t)
	mx2 := newMX(t, func(s *smtpServer) {
		s.MaxRecipients = 1
		s.Limits = []string{"MAILMAX=1"}
	})
	v.route("127.0.0.2", mx1.Addr)
	v.route("127.0.0.3", mx2.Addr)
	grey := smtpErr(451, smtp.EnhancedCode{4, 7, 1}, "greylisted, try later")
	mx1.rcptErr["b@example.test"] = grey
	mx1.rcptErr["c@example.test"] = grey
	refuse554 := rawServer(t, func(c net.Conn) { io.WriteString(c, "554 5.7.1 no service for you right now\r\n") })
	mx2.dataHook = func(*smtp.Conn) {
		if len(mx2.messages()) == 0 {
			v.route("127.0.0.3", refuse554)
		}
	}
	e := v.engine()
	st := deliver(t, e, testJob("example.test", "a@example.test", "b@example.test", "c@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "mx1.example.test[127.0.0.2]")
	wantStatus(t, st[1], 250, "2.0.0", "mx2.example.test[127.0.0.3]")
	wantStatus(t, st[2], 451, "4.7.1", "mx1.example.test[127.0.0.2]: 451 4.7.1 greylisted, try later")
	logs := v.logs.String()
	want := `new_session_failed="mx2.example.test[127.0.0.3]: 554 5.7.1 no service for you right now"`
	if !strings.Contains(logs, want) || strings.Contains(logs, "hosts_not_used=") {
		t.Errorf("the log line does not say the new session failed (%s), or names a host that delivered as not used:\n%s", want, logs)
	}
}

// The rest of a split message that no host ever answered for end with what
// a fresh attempt to the same hosts would say: a backup that refuses the
// new session with a 554 while the primary is down, or excluded by the
// MTA-STS policy, defers them with the primary named, as it would a new
// message; it does not bounce them.
func TestRestRefusedByTheBackupWhileThePrimaryIsOutDefer(t *testing.T) {
	for _, tc := range []struct {
		name    string
		primary string // in the fresh attempt's status
	}{
		{"primary down", "mx1.example.test[127.0.0.2]: connection refused"},
		{"primary excluded by the policy", "mx1.example.test: not listed in the MTA-STS policy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := newEnv(t,
				"example.test. 300 IN MX 10 mx1.example.test.",
				"example.test. 300 IN MX 20 mx2.example.test.",
				"mx1.example.test. 300 IN A 127.0.0.2",
				"mx2.example.test. 300 IN A 127.0.0.3")
			mx2 := newMX(t, withTLS(v.ca.Issue(t, "mx2.example.test")), func(s *smtpServer) { s.MaxRecipients = 2 })
			v.route("127.0.0.3", mx2.Addr)
			refuse554 := rawServer(t, func(c net.Conn) { io.WriteString(c, "554 5.7.1 no service for you right now\r\n") })
			mx2.dataHook = func(*smtp.Conn) {
				if len(mx2.messages()) == 1 {
					v.route("127.0.0.3", refuse554)
				}
			}
			opts := []func(*Options){func(o *Options) {
				o.Limits = []Limit{{Domains: []string{"example.test"}, Shaping: Shaping{MaxMessagesPerConn: 2}}}
			}}
			if tc.name == "primary excluded by the policy" {
				mx1 := newMX(t)
				v.route("127.0.0.2", mx1.Addr)
				opts = append(opts, func(o *Options) {
					o.Policy = policyFunc(func(_ context.Context, _ string, mxs []policy.MX) ([]policy.Requirement, error) {
						out := make([]policy.Requirement, len(mxs))
						for i, mx := range mxs {
							out[i] = policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS, Names: []string{mx.Name}}
							if mx.Name == "mx1.example.test" {
								out[i].Skip = "not listed in the MTA-STS policy"
							}
						}
						return out, nil
					})
				})
			} else {
				v.route("127.0.0.2", v.closed)
			}
			e := v.engine(opts...)
			st := deliver(t, e, testJob("example.test", fiveRecipients()...))
			for _, s := range st[:4] {
				wantStatus(t, s, 250, "2.0.0", "mx2.example.test[127.0.0.3]")
			}
			fresh := deliver(t, e, testJob("example.test", "f@example.test"))[0]
			if fresh.Permanent() || !strings.Contains(fresh.Text, tc.primary) {
				t.Fatalf("fresh attempt: %s; want a deferral naming %q", fresh, tc.primary)
			}
			if st[4] != fresh {
				t.Errorf("e@, refused a new session by the backup:\n  %s\nwant what a fresh attempt says:\n  %s", st[4], fresh)
			}
		})
	}
}

// A route's failures name its next hop, the host that failed, not the
// recipient domain's MX hosts, which it never met.
func TestRouteStatusNamesItsNexthop(t *testing.T) {
	v := newEnv(t, "relay.test. 300 IN A 127.0.0.1")
	up := newMX(t)
	_, port, _ := net.SplitHostPort(up.Addr)
	e := v.engine(withRoutes(Route{Domains: []string{"*"}, Nexthop: "[relay.test]:" + port}))
	job := testJob("gmail.test", "a@gmail.test")
	job.Envelope.SMTPUTF8 = true
	st := deliver(t, e, job)
	want := "no host of delivery.route[0]'s nexthop [relay.test]:" + port + " supports SMTPUTF8, which this message needs: "
	if st[0].Code != 550 || st[0].Enhanced != "5.6.7" || !strings.HasPrefix(st[0].Text, want) {
		t.Errorf("status %s\nwant 550 5.6.7 %s…", st[0], want)
	}
}

// A remote that refuses a transaction's first recipient at its
// recipient limit counts more than the transaction: no further
// transaction of the session is started for the rest, which get its
// reply, and the connection is not kept for the next message.
func TestFirstRecipientOverTheLimitEndsTheSessionsPart(t *testing.T) {
	v, mx := oneMX(t, func(s *smtpServer) { s.MaxRecipients = 2 }) // LIMITS RCPTMAX=2
	over := smtpErr(452, smtp.EnhancedCode{4, 5, 3}, "too many recipients from you today")
	for _, r := range fiveRecipients() {
		mx.rcptErr[r] = over
	}
	e := v.engine(func(o *Options) { o.IdleTimeout = time.Minute })
	for i, st := range deliver(t, e, testJob("example.test", fiveRecipients()...)) {
		wantStatus(t, st, 452, "4.5.3", "mx1.example.test[127.0.0.2]: 452 4.5.3 too many recipients from you today")
		if st.Permanent() {
			t.Errorf("recipient %d: %s, want it deferred", i, st.String())
		}
	}
	if n := mx.mostMails(); n != 1 {
		t.Errorf("the session carried %d MAIL commands, want 1: the rest went on after the remote refused the first recipient at its limit", n)
	}
	// The next message gets a new session, not the one that takes no
	// more recipients.
	delete(mx.rcptErr, "a@example.test")
	if st := deliver(t, e, testJob("example.test", "a@example.test")); !st[0].Delivered() {
		t.Fatalf("next message: %s", st[0].String())
	}
	if n := mx.sessionCount(); n != 2 {
		t.Errorf("%d sessions, want 2: the refusing one was kept", n)
	}
}
