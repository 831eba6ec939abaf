package delivery

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
)

func smtpErr(code int, enh smtp.EnhancedCode, msg string) *smtp.SMTPError {
	return &smtp.SMTPError{Code: code, EnhancedCode: enh, Message: msg}
}

func TestEachRecipientGetsItsOwnOutcome(t *testing.T) {
	v, mx := oneMX(t)
	mx.rcptErr["grey@example.test"] = smtpErr(451, smtp.EnhancedCode{4, 7, 1}, "greylisted, try later")
	mx.rcptErr["gone@example.test"] = smtpErr(550, smtp.EnhancedCode{5, 1, 1}, "no such user")
	st := deliver(t, v.engine(), testJob("example.test", "ok@example.test", "grey@example.test", "gone@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "mx1.example.test[127.0.0.2]: 250 2.0.0")
	wantStatus(t, st[1], 451, "4.7.1")
	if want := "mx1.example.test[127.0.0.2]: 451 4.7.1 greylisted, try later"; st[1].Text != want {
		t.Errorf("text = %q, want %q (docs/DESIGN.md, What deferrals say)", st[1].Text, want)
	}
	wantStatus(t, st[2], 550, "5.1.1", "no such user")
	for i, s := range st {
		if s.RemoteMTA != "mx1.example.test" {
			t.Errorf("recipient %d: RemoteMTA = %q", i, s.RemoteMTA)
		}
	}
	if m := mx.messages(); len(m) != 1 || !slices.Equal(m[0].rcpts, []string{"ok@example.test"}) {
		t.Errorf("remote got %+v, want one message to ok@example.test", m)
	}
}

func TestRcpt5xxDoesNotTryTheNextMX(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	mx1, mx2 := newMX(t), newMX(t)
	v.route("127.0.0.2", mx1.Addr)
	v.route("127.0.0.3", mx2.Addr)
	mx1.rcptErr["a@example.test"] = smtpErr(550, smtp.EnhancedCode{5, 1, 1}, "no such user")
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 550, "5.1.1")
	if mx2.sessionCount() != 0 {
		t.Error("the next MX was tried after a 5xx to RCPT")
	}
}

// twoMX is example.test with a primary and a backup MX, both test
// servers.
func twoMX(t *testing.T, opts ...mxOption) (*testEnv, *testMX, *testMX) {
	t.Helper()
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	mx1, mx2 := newMX(t, opts...), newMX(t, opts...)
	v.route("127.0.0.2", mx1.Addr)
	v.route("127.0.0.3", mx2.Addr)
	return v, mx1, mx2
}

// A 4xx reply means the host did not take the message (RFC 5321 §4.2.1),
// whatever step it came at: the recipient goes to the next MX host in the
// same attempt, as Postfix does. A primary with a full disk for days must
// not keep the mail from a healthy backup until it expires.
func TestTemporaryFailureAtPrimaryTriesTheBackupMX(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  func(m *testMX)
		said string
	}{
		{"MAIL 452", func(m *testMX) {
			m.mailErr = smtpErr(452, smtp.EnhancedCode{4, 3, 1}, "insufficient system storage")
		}, "452 4.3.1 insufficient system storage"},
		{"MAIL 421", func(m *testMX) {
			m.mailErr = smtpErr(421, smtp.EnhancedCode{4, 3, 2}, "shutting down")
		}, "421 4.3.2 shutting down"},
		{"RCPT 451", func(m *testMX) {
			m.rcptErr["a@example.test"] = smtpErr(451, smtp.EnhancedCode{4, 3, 0}, "temporary local problem")
		}, "451 4.3.0 temporary local problem"},
		{"end of data 451", func(m *testMX) {
			m.dataErr = smtpErr(451, smtp.EnhancedCode{4, 3, 0}, "queue file write error")
		}, "451 4.3.0 queue file write error"},
		{"connection lost at RCPT", func(m *testMX) {
			m.rcptHook = func(c *smtp.Conn, _ string) { c.Conn().Close() }
		}, "connection lost after RCPT"},
	} {
		for _, chunking := range []bool{true, false} {
			if chunking && strings.HasPrefix(tc.name, "connection lost") {
				continue // BDAT sent the message with RCPT (TestLostReplyAfterTheMessageDoesNotTryTheBackupMX)
			}
			name := tc.name + ", DATA"
			if chunking {
				name = tc.name + ", BDAT"
			}
			t.Run(name, func(t *testing.T) {
				v, mx1, mx2 := twoMX(t)
				tc.set(mx1)
				e := v.engine(func(o *Options) { o.NoChunking = !chunking })
				st := deliver(t, e, testJob("example.test", "a@example.test"))
				wantStatus(t, st[0], 250, "2.0.0", "mx2.example.test[127.0.0.3]")
				if len(mx1.messages()) != 0 || len(mx2.messages()) != 1 {
					t.Errorf("primary took %d, backup %d messages; want 0 and 1", len(mx1.messages()), len(mx2.messages()))
				}
				want := `earlier_hosts="mx1.example.test[127.0.0.2]: ` + tc.said
				if logs := v.logs.String(); !strings.Contains(logs, want) || !strings.Contains(logs, "mx=mx2.example.test") {
					t.Errorf("log line does not say the primary deferred (%s), then mx2:\n%s", want, logs)
				}
			})
		}
	}
}

// Only the recipients the primary deferred go to the backup; what it
// delivered or refused for good stands.
func TestBackupMXGetsOnlyTheRecipientsThePrimaryDeferred(t *testing.T) {
	v, mx1, mx2 := twoMX(t)
	mx1.rcptErr["grey@example.test"] = smtpErr(451, smtp.EnhancedCode{4, 7, 1}, "greylisted, try later")
	mx1.rcptErr["gone@example.test"] = smtpErr(550, smtp.EnhancedCode{5, 1, 1}, "no such user")
	st := deliver(t, v.engine(), testJob("example.test", "ok@example.test", "grey@example.test", "gone@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "mx1.example.test[127.0.0.2]")
	wantStatus(t, st[1], 250, "2.0.0", "mx2.example.test[127.0.0.3]")
	wantStatus(t, st[2], 550, "5.1.1", "mx1.example.test[127.0.0.2]: 550 5.1.1 no such user")
	if m := mx1.messages(); len(m) != 1 || !slices.Equal(m[0].rcpts, []string{"ok@example.test"}) {
		t.Errorf("primary took %+v, want one message to ok@", m)
	}
	if m := mx2.messages(); len(m) != 1 || !slices.Equal(m[0].rcpts, []string{"grey@example.test"}) {
		t.Errorf("backup took %+v, want one message to grey@", m)
	}
	if want := `earlier_hosts="mx1.example.test[127.0.0.2]: 451 4.7.1 greylisted, try later (1 of 3 recipients)"`; !strings.Contains(v.logs.String(), want) {
		t.Errorf("log does not contain %s:\n%s", want, v.logs.String())
	}
}

// When every host defers, the recipient's status is what the last one
// said, and the log names the others.
func TestEveryMXDeferringLeavesTheLastOnesReply(t *testing.T) {
	v, mx1, mx2 := twoMX(t)
	mx1.mailErr = smtpErr(452, smtp.EnhancedCode{4, 3, 1}, "insufficient system storage")
	mx2.rcptErr["a@example.test"] = smtpErr(451, smtp.EnhancedCode{4, 7, 1}, "greylisted, try later")
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.7.1", "mx2.example.test[127.0.0.3]: 451 4.7.1 greylisted, try later")
	logs := v.logs.String()
	for _, want := range []string{`earlier_hosts="mx1.example.test[127.0.0.2]: 452 4.3.1 insufficient system storage (1 of 1 recipients)"`, "mx=mx2.example.test", "ip=127.0.0.3"} {
		if !strings.Contains(logs, want) {
			t.Errorf("log does not contain %s:\n%s", want, logs)
		}
	}
}

// The connection lost once the message was out may have followed its
// storing: the recipients wait for the next attempt at the same host
// rather than go to another as a second copy. With BDAT the message goes
// with the envelope, so that is any lost reply.
func TestLostReplyAfterTheMessageDoesNotTryTheBackupMX(t *testing.T) {
	for _, tc := range []struct {
		name     string
		chunking bool
		set      func(m *testMX)
		want     string
	}{
		{"DATA", false, func(m *testMX) { m.dataHook = func(c *smtp.Conn) { c.Conn().Close() } }, "connection lost after end of data"},
		{"BDAT", true, func(m *testMX) { m.dataHook = func(c *smtp.Conn) { c.Conn().Close() } }, "connection lost after end of data"},
		{"BDAT, lost at RCPT", true, func(m *testMX) {
			m.rcptHook = func(c *smtp.Conn, _ string) { c.Conn().Close() }
		}, "connection lost after RCPT"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, mx1, mx2 := twoMX(t)
			tc.set(mx1)
			st := deliver(t, v.engine(func(o *Options) { o.NoChunking = !tc.chunking }), testJob("example.test", "a@example.test"))
			wantStatus(t, st[0], 451, "4.4.2", "mx1.example.test[127.0.0.2]: "+tc.want)
			if n := mx2.sessionCount(); n != 0 {
				t.Error("the backup was tried after the primary may have taken the message")
			}
		})
	}
}

// Each host's requirement holds for the recipients it is offered: a
// backup that fails MTA-STS gets nothing, and the primary's reply stands.
func TestDeferredRecipientsMeetTheBackupsOwnRequirement(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	mx1 := newMX(t, withTLS(v.ca.Issue(t, "mx1.example.test")))
	mx2 := newMX(t) // no STARTTLS
	v.route("127.0.0.2", mx1.Addr)
	v.route("127.0.0.3", mx2.Addr)
	mx1.mailErr = smtpErr(452, smtp.EnhancedCode{4, 3, 1}, "insufficient system storage")
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS})
	})
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 452, "4.3.1", "mx1.example.test[127.0.0.2]: 452 4.3.1 insufficient system storage")
	if mx2.sessionCount() != 1 || len(mx2.messages()) != 0 {
		t.Errorf("backup: %d sessions, %d messages; want it reached and given nothing", mx2.sessionCount(), len(mx2.messages()))
	}
	logs := v.logs.String()
	for _, want := range []string{"mx=mx1.example.test", `hosts_not_used="mx2.example.test[127.0.0.3]: STARTTLS not offered (MTA-STS)"`} {
		if !strings.Contains(logs, want) {
			t.Errorf("log does not contain %s:\n%s", want, logs)
		}
	}
}

func TestMail5xxFailsEveryRecipient(t *testing.T) {
	v, mx := oneMX(t)
	mx.mailErr = smtpErr(550, smtp.EnhancedCode{5, 7, 1}, "sender rejected")
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test", "b@example.test"))
	for _, s := range st {
		wantStatus(t, s, 550, "5.7.1", "sender rejected")
	}
}

func TestReplyWithoutEnhancedCodeGetsTheClassCode(t *testing.T) {
	v, mx := oneMX(t)
	mx.mailErr = smtpErr(452, smtp.NoEnhancedCode, "too busy")
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 452, "4.0.0", "too busy")
}

func Test421MidTransactionDefersTheWholeTransaction(t *testing.T) {
	v, mx := oneMX(t)
	mx.rcptErr["b@example.test"] = smtpErr(421, smtp.EnhancedCode{4, 3, 2}, "shutting down")
	mx.rcptErr["c@example.test"] = smtpErr(550, smtp.EnhancedCode{5, 1, 1}, "no such user")
	job := testJob("example.test", "c@example.test", "a@example.test", "b@example.test", "d@example.test")
	st := deliver(t, v.engine(noChunking), job)
	wantStatus(t, st[0], 550, "5.1.1") // answered for good before the 421
	for _, s := range st[1:] {
		wantStatus(t, s, 421, "4.3.2", "shutting down")
	}
	if len(mx.messages()) != 0 {
		t.Error("message sent after a 421")
	}
}

// With BDAT the body goes with the envelope, so a remote that answers
// one RCPT 421 and reads on (go-smtp's server does; RFC 5321 §3.8 says it
// should close) may deliver to the others, and its replies are taken as
// they are: delivered where BDAT got 250, deferred where RCPT got 421.
// Deferring everyone, as on DATA, would send the delivered a second copy.
// The connection is not used again.
func Test421MidTransactionWithBDATTakesEveryReply(t *testing.T) {
	v, mx := oneMX(t)
	mx.rcptErr["b@example.test"] = smtpErr(421, smtp.EnhancedCode{4, 3, 2}, "shutting down")
	mx.rcptErr["c@example.test"] = smtpErr(550, smtp.EnhancedCode{5, 1, 1}, "no such user")
	job := testJob("example.test", "c@example.test", "a@example.test", "b@example.test", "d@example.test")
	e := v.engine(func(o *Options) { o.IdleTimeout = 5 * time.Second })
	st := deliver(t, e, job)
	wantStatus(t, st[0], 550, "5.1.1")
	wantStatus(t, st[1], 250, "2.0.0")
	wantStatus(t, st[2], 421, "4.3.2", "shutting down")
	wantStatus(t, st[3], 250, "2.0.0")
	if m := mx.messages(); len(m) != 1 || !slices.Equal(m[0].rcpts, []string{"a@example.test", "d@example.test"}) {
		t.Fatalf("remote stored %+v, want one message to a and d", m)
	}
	delete(mx.rcptErr, "b@example.test")
	st = deliver(t, e, testJob("example.test", "b@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if n := mx.sessionCount(); n != 2 {
		t.Fatalf("%d connections, want 2: the one that said 421 was used again", n)
	}
}

func TestDroppedConnectionDefersTheWholeTransaction(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(mx *testMX)
		want  string
	}{
		{"during RCPT", func(mx *testMX) {
			mx.rcptHook = func(c *smtp.Conn, to string) {
				if to == "b@example.test" {
					c.Conn().Close()
				}
			}
		}, "connection lost after RCPT"},
		{"after DATA", func(mx *testMX) {
			mx.dataHook = func(c *smtp.Conn) { c.Conn().Close() }
		}, "connection lost after end of data"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, mx := oneMX(t)
			tc.setup(mx)
			st := deliver(t, v.engine(), testJob("example.test", "a@example.test", "b@example.test"))
			for _, s := range st {
				wantStatus(t, s, 451, "4.4.2", "mx1.example.test[127.0.0.2]: "+tc.want)
			}
		})
	}
}

// RFC 1870 §6.1: a message larger than a host's declared SIZE limit is
// not sent to it; the next host may take it, and when none may it
// returns with 5.3.4.
func TestMessageOverTheHostsSizeLimitIsNotSent(t *testing.T) {
	small := func(s *smtpServer) { s.MaxMessageBytes = int64(len(testBody)) - 1 }
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	mx1, mx2 := newMX(t, small), newMX(t)
	v.route("127.0.0.2", mx1.Addr)
	v.route("127.0.0.3", mx2.Addr)
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "mx2.example.test")
	if n := mx1.mostMails(); n != 0 {
		t.Errorf("mx1, whose limit the message is over, got %d MAIL commands", n)
	}

	v.route("127.0.0.3", newMX(t, small).Addr)
	st = deliver(t, v.engine(), testJob("example.test", "b@example.test"))
	wantStatus(t, st[0], 552, "5.3.4", "is larger than the host's limit")
}

func TestDataRejectionAppliesToAcceptedRecipients(t *testing.T) {
	v, mx := oneMX(t)
	mx.dataErr = smtpErr(554, smtp.EnhancedCode{5, 7, 1}, "spam detected")
	mx.rcptErr["b@example.test"] = smtpErr(450, smtp.EnhancedCode{4, 2, 1}, "mailbox busy")
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test", "b@example.test"))
	wantStatus(t, st[0], 554, "5.7.1", "spam detected")
	wantStatus(t, st[1], 450, "4.2.1", "mailbox busy")
}

func TestGreetingRefusalTriesTheNextMX(t *testing.T) {
	for _, greeting := range []string{"421 4.3.2 too busy", "554 no SMTP service here"} {
		t.Run(greeting[:3], func(t *testing.T) {
			v := newEnv(t,
				"example.test. 300 IN MX 10 mx1.example.test.",
				"example.test. 300 IN MX 20 mx2.example.test.",
				"mx1.example.test. 300 IN A 127.0.0.2",
				"mx1.example.test. 300 IN A 127.0.0.4",
				"mx2.example.test. 300 IN A 127.0.0.3")
			busy := rawServer(t, func(c net.Conn) { io.WriteString(c, greeting+"\r\n") })
			mx2 := newMX(t)
			v.route("127.0.0.2", busy)
			v.route("127.0.0.4", busy)
			v.route("127.0.0.3", mx2.Addr)
			st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
			wantStatus(t, st[0], 250, "2.0.0", "mx2.example.test")
		})
	}
}

// A host that refuses the session for good on one address and cannot be
// reached on another gets the same outcome whichever address DNS lists
// first: its own refusal, a bounce when it is the only host, a deferral
// when another host was merely unreachable. Check says the same.
func TestHostsRefusalDecidesWhicheverAddressSaysIt(t *testing.T) {
	for _, tc := range []struct {
		name     string
		backup   bool // mx2, unreachable
		code     int
		enhanced string
	}{
		{"one host", false, 554, "5.7.1"},
		{"a backup unreachable", true, 451, "4.4.1"},
	} {
		for _, refusingFirst := range []bool{true, false} {
			t.Run(fmt.Sprintf("%s/refusing address first %v", tc.name, refusingFirst), func(t *testing.T) {
				records := []string{"example.test. 300 IN MX 10 mx1.example.test.",
					"mx1.example.test. 300 IN A 127.0.0.2", "mx1.example.test. 300 IN A 127.0.0.4"}
				if tc.backup {
					records = append(records, "example.test. 300 IN MX 20 mx2.example.test.", "mx2.example.test. 300 IN A 127.0.0.3")
				}
				v := newEnv(t, records...)
				refusing := "127.0.0.4"
				if refusingFirst {
					refusing = "127.0.0.2"
				}
				v.route(refusing, rawServer(t, func(c net.Conn) { io.WriteString(c, "554 5.7.1 no service for you\r\n") }))
				st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))[0]
				wantStatus(t, st, tc.code, tc.enhanced, "mx1.example.test["+refusing+"]: 554 5.7.1 no service for you")
				if r := v.engine().Check(t.Context(), "example.test", true); r.Outcome.Code != st.Code || r.Outcome.Enhanced != st.Enhanced {
					t.Errorf("check says %q, delivery got %q", r.Outcome, st)
				}
			})
		}
	}
}

// RFC 5321 §4.1.1.1: a 4xx or 5xx to EHLO, other than "not recognized",
// refuses the session as a refused greeting does: the remote's words in
// the status, a 421 lowers concurrency, and the TLS report learns
// nothing, since the host never said whether it offers STARTTLS.
func TestEHLORefusalDefersWithTheRemotesReply(t *testing.T) {
	for _, tc := range []struct {
		name   string
		policy policy.PolicySource
	}{
		{"opportunistic", nil},
		{"MTA-STS enforce", everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, _ := oneMX(t)
			mx := &scriptMX{replies: map[string]string{"EHLO": "421 4.7.0 mx.test too many connections from your IP, try later"}}
			v.route("127.0.0.2", newScriptMX(t, mx))
			e := v.engine(func(o *Options) { o.Policy = tc.policy })
			var th throttles
			st := deliver(t, e, th.job("example.test", "a@example.test"))
			wantStatus(t, st[0], 421, "4.7.0", "mx1.example.test[127.0.0.2]: 421 4.7.0 mx.test too many connections from your IP")
			if res := v.rec.results(); len(res) != 0 {
				t.Errorf("TLS report results %+v for a host that refused the session before STARTTLS", res)
			}
			if len(th.got) != 1 {
				t.Errorf("queue told %q, want one throttle signal for the 421", th.got)
			}
			if got := mx.verbs(); !slices.Equal(got, []string{"EHLO"}) {
				t.Errorf("commands %q, want EHLO alone", got)
			}
		})
	}
}

// The host answered: its other address is not tried, the next host is.
func TestEHLORefusalTriesTheNextMX(t *testing.T) {
	for _, refusal := range []string{"421 4.3.2 too busy", "554 5.7.1 no service for you"} {
		t.Run(refusal[:3], func(t *testing.T) {
			v := newEnv(t,
				"example.test. 300 IN MX 10 mx1.example.test.",
				"example.test. 300 IN MX 20 mx2.example.test.",
				"mx1.example.test. 300 IN A 127.0.0.2",
				"mx1.example.test. 300 IN A 127.0.0.4",
				"mx2.example.test. 300 IN A 127.0.0.3")
			mx1 := &scriptMX{replies: map[string]string{"EHLO": refusal}}
			mx2 := newMX(t)
			addr := newScriptMX(t, mx1)
			v.route("127.0.0.2", addr)
			v.route("127.0.0.4", addr)
			v.route("127.0.0.3", mx2.Addr)
			st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
			wantStatus(t, st[0], 250, "2.0.0", "mx2.example.test")
			if got := mx1.verbs(); !slices.Equal(got, []string{"EHLO"}) {
				t.Errorf("mx1 got %q, want one EHLO", got)
			}
		})
	}
}

// RFC 5321 §3.2: a server that does not know EHLO gets HELO, once; HELO
// has no STARTTLS, which a policy that requires TLS does not accept.
func TestServerWithoutEHLOGetsHELO(t *testing.T) {
	for _, tc := range []struct {
		name   string
		policy policy.PolicySource
		want   []string
	}{
		{"opportunistic", nil, []string{"EHLO", "HELO", "MAIL", "RCPT", "DATA", "QUIT"}},
		{"MTA-STS enforce", everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS}), []string{"EHLO"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, _ := oneMX(t)
			mx := &scriptMX{replies: map[string]string{"EHLO": "502 5.5.2 command not recognized", "HELO": "250 mx.test"}}
			v.route("127.0.0.2", newScriptMX(t, mx))
			e := v.engine(func(o *Options) { o.Policy = tc.policy })
			st := deliver(t, e, testJob("example.test", "a@example.test"))
			res := v.rec.results()
			if len(res) != 1 || res[0].Result != policy.ResultSTARTTLSNotSupported {
				t.Errorf("TLS report results %+v, want one starttls-not-supported", res)
			}
			if tc.policy == nil {
				wantStatus(t, st[0], 250, "2.0.0")
			} else {
				wantStatus(t, st[0], 451, "4.4.8", "mx1.example.test: STARTTLS not offered (EHLO not supported: 502 5.5.2 command not recognized)")
			}
			if got := mx.verbs(); !slices.Equal(got, tc.want) {
				t.Errorf("commands %q, want %q", got, tc.want)
			}
		})
	}
}

func TestConnectionIsReusedForTheNextMessageToTheDomain(t *testing.T) {
	v, mx := oneMX(t, withTLS(mustCert(t)))
	e := v.engine(func(o *Options) { o.IdleTimeout = 5 * time.Second })
	for range 3 {
		st := deliver(t, e, testJob("example.test", "a@example.test"))
		wantStatus(t, st[0], 250, "2.0.0")
	}
	if n, m := mx.sessionCount(), len(mx.messages()); n != 1 || m != 3 {
		t.Errorf("%d messages over %d connections, want 3 over 1", m, n)
	}
	if !strings.Contains(v.logs.String(), "reused=true") {
		t.Error("log does not say the connection was reused")
	}
}

func TestIdleConnectionClosedAfterIdleTimeout(t *testing.T) {
	v, mx := oneMX(t)
	e := v.engine(func(o *Options) { o.IdleTimeout = 100 * time.Millisecond })
	deliver(t, e, testJob("example.test", "a@example.test"))
	time.Sleep(400 * time.Millisecond)
	deliver(t, e, testJob("example.test", "a@example.test"))
	if n := mx.sessionCount(); n != 2 {
		t.Errorf("%d connections, want 2 (the idle one expired)", n)
	}
}

func TestDeadIdleConnectionIsReplaced(t *testing.T) {
	v, mx := oneMX(t)
	e := v.engine(func(o *Options) { o.IdleTimeout = 5 * time.Second })
	var conns []net.Conn
	mx.rcptHook = func(c *smtp.Conn, _ string) { conns = append(conns, c.Conn()) }
	deliver(t, e, testJob("example.test", "a@example.test"))
	conns[0].Close() // the remote hangs up while we hold the connection idle
	st := deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if n := mx.sessionCount(); n != 2 {
		t.Errorf("%d connections, want 2", n)
	}
}

func TestRequirementChangeDoesNotReuseConnection(t *testing.T) {
	v, mx := oneMX(t, withTLS(mustCert(t)))
	req := policy.Requirement{}
	e := v.engine(func(o *Options) {
		o.IdleTimeout = 5 * time.Second
		o.Policy = policyFunc(func(_ ctxT, _ string, mxs []policy.MX) ([]policy.Requirement, error) {
			return []policy.Requirement{req}, nil
		})
	})
	deliver(t, e, testJob("example.test", "a@example.test"))
	req = policy.Requirement{Security: policy.SecurityEncrypt, Policy: testSTS}
	deliver(t, e, testJob("example.test", "a@example.test"))
	if n := mx.sessionCount(); n != 2 {
		t.Errorf("%d connections, want 2: a connection made under one requirement must not carry mail under another", n)
	}
}

func TestMaxConnsPerDomainMakesRoomByClosingIdle(t *testing.T) {
	v, mx := oneMX(t)
	req := policy.Requirement{}
	e := v.engine(func(o *Options) {
		o.IdleTimeout = time.Minute
		o.MaxConnsPerDomain = 1
		o.Policy = policyFunc(func(_ ctxT, _ string, mxs []policy.MX) ([]policy.Requirement, error) {
			return []policy.Requirement{req}, nil
		})
	})
	deliver(t, e, testJob("example.test", "a@example.test"))
	// Another requirement needs another connection; the idle one holds the
	// only slot and must give it up rather than block until it expires.
	req = policy.Requirement{Policy: testSTS, Testing: true, Security: policy.SecurityVerify}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st := e.Deliver(ctx, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if n := mx.sessionCount(); n != 2 {
		t.Errorf("%d connections, want 2", n)
	}
}

func TestMaxConnsPerDomainWaitsForAFreeSlot(t *testing.T) {
	v, mx := oneMX(t)
	release := make(chan struct{})
	mx.rcptHook = func(*smtp.Conn, string) { <-release }
	e := v.engine(func(o *Options) { o.MaxConnsPerDomain = 1 })
	done := make(chan []queue.Status)
	go func() { done <- deliver(t, e, testJob("example.test", "a@example.test")) }()
	time.Sleep(100 * time.Millisecond) // the first delivery holds the slot

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	st := e.Deliver(ctx, testJob("example.test", "b@example.test"))
	wantStatus(t, st[0], 451, "4.4.2", "waiting for a free connection slot")
	close(release)
	if st := <-done; !st[0].Delivered() {
		t.Errorf("first delivery: %v", st[0])
	}
	if n := mx.sessionCount(); n != 1 {
		t.Errorf("%d connections with a limit of 1", n)
	}
}

func TestSMTPUTF8MessageFailsPermanentlyWhenRemoteLacksIt(t *testing.T) {
	v, mx := oneMX(t)
	job := testJob("example.test", "jöran@example.test")
	st := deliver(t, v.engine(), job)
	wantStatus(t, st[0], 550, "5.6.7", "SMTPUTF8 not supported")
	if len(mx.messages()) != 0 {
		t.Error("message sent to a remote without SMTPUTF8")
	}

	mx.srv.EnableSMTPUTF8 = true
	st = deliver(t, v.engine(), job)
	wantStatus(t, st[0], 250, "2.0.0")
	if m := mx.messages(); len(m) != 1 || !m[0].mail.UTF8 {
		t.Errorf("want one message with MAIL … SMTPUTF8, got %+v", m)
	}
}

// The envelope holds ENVID and ORCPT decoded, as smtpin receives them; a
// "+2B" in them is literal text (plus addressing), not xtext to decode again.
func TestDSNParametersPassedToDSNCapableRemote(t *testing.T) {
	v, mx := oneMX(t)
	mx.srv.EnableDSN = true
	job := testJob("example.test", "a@example.test", "b@example.test")
	job.Envelope.Ret, job.Envelope.EnvID = "HDRS", "QQ+2B314"
	job.Recipients[0].Notify = []string{"SUCCESS", "FAILURE"}
	job.Recipients[0].ORcpt = "rfc822;orig+2Ba@example.test"
	job.Recipients[1].Notify = []string{"NEVER"}
	st := deliver(t, v.engine(), job)
	for _, s := range st {
		wantStatus(t, s, 250, "2.0.0")
		if s.Relayed {
			t.Error("Relayed set although the remote supports DSN")
		}
	}
	m := mx.messages()
	if len(m) != 1 {
		t.Fatalf("got %d messages", len(m))
	}
	if m[0].mail.Return != smtp.DSNReturnHeaders || m[0].mail.EnvelopeID != "QQ+2B314" {
		t.Errorf("MAIL RET=%q ENVID=%q, want HDRS and QQ+2B314", m[0].mail.Return, m[0].mail.EnvelopeID)
	}
	r0 := m[0].rcptOpts[0]
	if !slices.Equal(r0.Notify, []smtp.DSNNotify{"SUCCESS", "FAILURE"}) || r0.OriginalRecipient != "orig+2Ba@example.test" ||
		r0.OriginalRecipientType != smtp.DSNAddressTypeRFC822 {
		t.Errorf("RCPT 1 options %+v, want NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig+2Ba@example.test", r0)
	}
	if !slices.Equal(m[0].rcptOpts[1].Notify, []smtp.DSNNotify{"NEVER"}) {
		t.Errorf("RCPT 2 NOTIFY = %v, want NEVER", m[0].rcptOpts[1].Notify)
	}
}

func TestRelayedWhenRemoteLacksDSNAndNotifyHasSuccess(t *testing.T) {
	v, mx := oneMX(t)
	job := testJob("example.test", "a@example.test", "b@example.test")
	job.Recipients[0].Notify = []string{"success"}
	job.Recipients[1].Notify = []string{"FAILURE"}
	st := deliver(t, v.engine(), job)
	if !st[0].Relayed || st[1].Relayed {
		t.Errorf("Relayed = %t, %t; want true for NOTIFY=SUCCESS only", st[0].Relayed, st[1].Relayed)
	}
	if m := mx.messages(); len(m) != 1 || m[0].rcptOpts[0].Notify != nil {
		t.Errorf("DSN parameters sent to a remote without DSN: %+v", m)
	}
}

func TestSizeAndEightBitPassedWhenSupported(t *testing.T) {
	v, mx := oneMX(t)
	mx.srv.MaxMessageBytes = 1 << 20
	job := testJob("example.test", "a@example.test")
	job.Envelope.Body8Bit = true
	deliver(t, v.engine(), job)
	m := mx.messages()
	if len(m) != 1 || m[0].mail.Size != job.Size || m[0].mail.Body != smtp.Body8BitMIME {
		t.Errorf("MAIL options %+v, want SIZE=%d BODY=8BITMIME", m, job.Size)
	}
}

func TestUnreadableQueueFileDefersWithoutConnecting(t *testing.T) {
	v, mx := oneMX(t)
	job := testJob("example.test", "a@example.test")
	job.Open = func() (io.ReadCloser, error) { return nil, io.ErrUnexpectedEOF }
	st := deliver(t, v.engine(), job)
	wantStatus(t, st[0], 451, "4.3.0", "reading the queued message")
	if mx.sessionCount() != 0 {
		t.Error("connected although the message cannot be read")
	}
}

// mustCert is a certificate nobody in particular trusts, for opportunistic TLS.
func mustCert(t *testing.T) tls.Certificate {
	return testEnvCA(t).Issue(t, "mx1.example.test")
}

// --- REQUIRETLS (RFC 8689) ---

func requireTLSJob() *queue.Job {
	j := testJob("example.test", "a@example.test")
	j.Envelope.RequireTLS = true
	return j
}

func TestRequireTLSDeliveredWhenEveryConditionHolds(t *testing.T) {
	v, mx := oneMX(t)
	mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, "mx1.example.test")}}
	mx.srv.EnableREQUIRETLS = true
	e := v.engine(func(o *Options) { o.Policy = everyMX(policy.Requirement{MXValidated: true}) })
	st := deliver(t, e, requireTLSJob())
	wantStatus(t, st[0], 250, "2.0.0")
	if m := mx.messages(); len(m) != 1 || !m[0].mail.RequireTLS || !m[0].tls {
		t.Errorf("want one message over TLS with MAIL … REQUIRETLS, got %+v", m)
	}
}

func TestRequireTLSAcceptsAnMXValidatedByDNSSEC(t *testing.T) {
	v, mx := oneMX(t)
	mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, "mx1.example.test")}}
	mx.srv.EnableREQUIRETLS = true
	e := v.engine() // no policy source: only DNSSEC can validate the MX
	st := deliver(t, e, requireTLSJob())
	wantStatus(t, st[0], 550, "5.7.30", "MX host not validated")

	v.dns.Secure("example.test", "mx1.example.test")
	st = deliver(t, v.engine(), requireTLSJob())
	wantStatus(t, st[0], 250, "2.0.0")
}

func TestRequireTLSFailsPermanentlyWhenNoHostQualifies(t *testing.T) {
	for _, tc := range []struct {
		name        string
		validated   bool
		cert        string // "" = no STARTTLS
		requireTLS  bool   // remote advertises REQUIRETLS
		want        string
		wantSession bool
	}{
		{"MX not validated", false, "mx1.example.test", true, "MX host not validated by DNSSEC or MTA-STS", false},
		{"no STARTTLS", true, "", true, "STARTTLS not offered", true},
		{"certificate for another name", true, "other.example.test", true, "certificate not valid for the MX host name", true},
		{"REQUIRETLS not advertised", true, "mx1.example.test", false, "REQUIRETLS not supported", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, mx := oneMX(t)
			if tc.cert != "" {
				mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, tc.cert)}}
			}
			mx.srv.EnableREQUIRETLS = tc.requireTLS
			e := v.engine(func(o *Options) { o.Policy = everyMX(policy.Requirement{MXValidated: tc.validated}) })
			st := deliver(t, e, requireTLSJob())
			wantStatus(t, st[0], 550, "5.7.30", tc.want)
			if len(mx.messages()) != 0 {
				t.Error("a REQUIRETLS message was sent")
			}
			if (mx.sessionCount() > 0) != tc.wantSession {
				t.Errorf("%d sessions, want some: %t", mx.sessionCount(), tc.wantSession)
			}
		})
	}
}

// An MX host outside an MTA-STS testing policy is delivered to for normal
// mail, but it is not a validated MX for REQUIRETLS (RFC 8689 §4.2.1).
func TestRequireTLSRefusesAnMXOutsideATestingPolicy(t *testing.T) {
	v, mx := oneMX(t)
	mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, "mx1.example.test")}}
	mx.srv.EnableREQUIRETLS = true
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS, Names: []string{"mx1.example.test"},
			Testing: true, Skip: "not listed in the MTA-STS policy for example.test"})
	})
	st := deliver(t, e, requireTLSJob())
	wantStatus(t, st[0], 550, "5.7.30", "MX host not validated")
	if len(mx.messages()) != 0 {
		t.Fatal("a REQUIRETLS message went to an MX that the testing policy does not list")
	}
	// The same host gets ordinary mail: testing only reports.
	st = deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
}

func TestRequireTLSNeverFallsBackToPlaintext(t *testing.T) {
	v, mx := oneMX(t, brokenTLS(t))
	e := v.engine(func(o *Options) { o.Policy = everyMX(policy.Requirement{MXValidated: true}) })
	st := deliver(t, e, requireTLSJob())
	wantStatus(t, st[0], 550, "5.7.30", "TLS handshake failed")
	if mx.sessionCount() != 1 || len(mx.messages()) != 0 {
		t.Errorf("%d sessions, %d messages; want 1 and 0", mx.sessionCount(), len(mx.messages()))
	}
}

func TestRequireTLSDefersWhenAHostWasUnreachable(t *testing.T) {
	// One host lacks REQUIRETLS, the better one did not answer: it may
	// qualify next time, so this is not yet a permanent failure.
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	mx2 := newMX(t, withTLS(v.ca.Issue(t, "mx2.example.test")))
	v.route("127.0.0.3", mx2.Addr)
	e := v.engine(func(o *Options) { o.Policy = everyMX(policy.Requirement{MXValidated: true}) })
	st := deliver(t, e, requireTLSJob())
	wantStatus(t, st[0], 451, "4.4.1", "connection refused", "REQUIRETLS not supported")
}

func TestNoTLSPolicyMessageIgnoresMTASTSButStillUsesTLS(t *testing.T) {
	v, mx := oneMX(t)
	mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, "wrong.example.test")}}
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS})
	})
	job := testJob("example.test", "a@example.test")
	st := deliver(t, e, job)
	wantStatus(t, st[0], 451, "4.4.8") // without the header: enforced

	job.Envelope.NoTLSPolicy = true
	st = deliver(t, e, job)
	wantStatus(t, st[0], 250, "2.0.0")
	if m := mx.messages(); len(m) != 1 || !m[0].tls {
		t.Errorf("want one message over TLS, got %+v", m)
	}
}

func TestTLSReportMessageGoesDespiteMTASTSAndItsSessionsAreMarked(t *testing.T) {
	// RFC 8460 §3: reports go out despite TLS failures, and their sessions
	// are not counted in the next report, so the recorder must know them.
	v, mx := oneMX(t)
	mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, "wrong.example.test")}}
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS})
	})
	job := testJob("example.test", "a@example.test")
	job.Envelope.NoTLSPolicy, job.Envelope.TLSReport = true, true
	st := deliver(t, e, job)
	wantStatus(t, st[0], 250, "2.0.0")
	got := v.rec.results()
	if len(got) == 0 {
		t.Fatal("no session result recorded")
	}
	for _, r := range got {
		if !r.Unreported {
			t.Errorf("session result %+v is not left out of TLS reports", r)
		}
	}
}

// --- remotes that misbehave ---

func TestRemoteThatIsNotSMTPDefers(t *testing.T) {
	for _, tc := range []struct {
		name   string
		handle func(c net.Conn)
		want   string
	}{
		{"HTTP server", func(c net.Conn) {
			io.WriteString(c, "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
		}, "malformed reply waiting for the greeting"},
		{"binary garbage", func(c net.Conn) {
			c.Write([]byte{0x16, 0x03, 0x01, 0x00, 0xff, '\r', '\n'})
		}, "malformed reply waiting for the greeting"},
		{"multi-megabyte line", func(c net.Conn) {
			io.WriteString(c, "220 ")
			line := strings.Repeat("x", 1<<20)
			for range 8 {
				if _, err := io.WriteString(c, line); err != nil {
					return
				}
			}
		}, "reply too long waiting for the greeting"},
		{"endless multi-line reply", func(c net.Conn) {
			for {
				if _, err := io.WriteString(c, "220-still greeting you\r\n"); err != nil {
					return
				}
			}
		}, "reply too long waiting for the greeting"},
		{"endless EHLO reply", func(c net.Conn) {
			io.WriteString(c, "220 mx ESMTP\r\n")
			bufio.NewReader(c).ReadString('\n')
			for {
				if _, err := io.WriteString(c, "250-PIPELINING\r\n"); err != nil {
					return
				}
			}
		}, "reply too long EHLO"},
		{"hangs up after greeting", func(c net.Conn) {
			io.WriteString(c, "220 mx ESMTP\r\n")
		}, "connection lost EHLO"},
		{"data after STARTTLS reply", func(c net.Conn) {
			r := bufio.NewReader(c)
			io.WriteString(c, "220 mx ESMTP\r\n")
			r.ReadString('\n')
			io.WriteString(c, "250-mx\r\n250 STARTTLS\r\n")
			r.ReadString('\n')
			io.WriteString(c, "220 go ahead\r\n250 injected\r\n")
			r.ReadString('\n')
		}, "data after the STARTTLS reply"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v := newEnv(t,
				"example.test. 300 IN MX 10 mx1.example.test.",
				"mx1.example.test. 300 IN A 127.0.0.2")
			v.route("127.0.0.2", rawServer(t, tc.handle))
			start := time.Now()
			st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
			wantStatus(t, st[0], 451, "4.4.2", "mx1.example.test[127.0.0.2]: "+tc.want)
			if d := time.Since(start); d > 3*time.Second {
				t.Errorf("took %v", d)
			}
		})
	}
}

func TestUnexpectedSuccessCodeIsNeverADelivery(t *testing.T) {
	for _, tc := range []struct {
		name   string
		handle func(c net.Conn)
	}{
		{"greeting 250", func(c net.Conn) { io.WriteString(c, "250 hello\r\n") }},
		{"DATA answered 250", func(c net.Conn) {
			r := bufio.NewReader(c)
			io.WriteString(c, "220 mx ESMTP\r\n")
			for _, reply := range []string{"250 mx", "250 mx", "250 ok", "250 ok", "250 2.0.0 sure"} {
				if _, err := r.ReadString('\n'); err != nil {
					return
				}
				io.WriteString(c, reply+"\r\n")
			}
			r.ReadString('\n')
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, _ := oneMX(t)
			v.route("127.0.0.2", rawServer(t, tc.handle))
			st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
			wantStatus(t, st[0], 451, "4.5.0", "unexpected reply 250")
		})
	}
}

func TestSilentRemotesTimeOut(t *testing.T) {
	for _, tc := range []struct {
		name   string
		setup  func(v *testEnv, mx *testMX)
		adjust func(o *Options)
		want   string
	}{
		{"no greeting", func(v *testEnv, _ *testMX) {
			v.route("127.0.0.2", rawServer(t, func(c net.Conn) { time.Sleep(3 * time.Second) }))
		}, func(o *Options) { o.Timeouts.Greeting = 200 * time.Millisecond }, "timeout waiting for the greeting"},
		{"slow RCPT", func(_ *testEnv, mx *testMX) {
			mx.rcptHook = func(*smtp.Conn, string) { time.Sleep(time.Second) }
		}, func(o *Options) {
			// go-smtp's server offers PIPELINING: the replies of the group
			// share one deadline, the sum of the commands' timeouts.
			o.Timeouts.Mail, o.Timeouts.Rcpt, o.Timeouts.DataInit = 100*time.Millisecond, 100*time.Millisecond, 100*time.Millisecond
			o.NoChunking = true
		}, "timeout after RCPT"},
		{"slow RCPT, BDAT", func(_ *testEnv, mx *testMX) {
			mx.rcptHook = func(*smtp.Conn, string) { time.Sleep(time.Second) }
		}, func(o *Options) {
			// The body went with the envelope: its timeouts add to the
			// group's deadline.
			o.Timeouts.Mail, o.Timeouts.Rcpt = 100*time.Millisecond, 100*time.Millisecond
			o.Timeouts.DataBlock, o.Timeouts.DataFinal = 100*time.Millisecond, 100*time.Millisecond
		}, "timeout after RCPT"},
		{"slow final reply, DATA", func(_ *testEnv, mx *testMX) {
			mx.dataHook = func(*smtp.Conn) { time.Sleep(time.Second) }
		}, func(o *Options) { o.Timeouts.DataFinal, o.NoChunking = 200*time.Millisecond, true }, "timeout after end of data"},
		{"slow final reply", func(_ *testEnv, mx *testMX) {
			mx.dataHook = func(*smtp.Conn) { time.Sleep(time.Second) }
		}, func(o *Options) { o.Timeouts.DataFinal = 200 * time.Millisecond }, "timeout after end of data"},
		{"connect", func(v *testEnv, _ *testMX) {
			v.blackhole["127.0.0.2"] = true
		}, func(o *Options) { o.ConnectTimeout = 200 * time.Millisecond }, "connection timed out"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, mx := oneMX(t)
			tc.setup(v, mx)
			start := time.Now()
			st := deliver(t, v.engine(tc.adjust), testJob("example.test", "a@example.test"))
			if d := time.Since(start); d > 900*time.Millisecond {
				t.Errorf("took %v, want about the 200ms timeout", d)
			}
			if !strings.Contains(st[0].Text, tc.want) || st[0].Code != 451 {
				t.Errorf("status %q, want 451 … %s", st[0], tc.want)
			}
		})
	}
}

func TestStalledMessageTransferTimesOut(t *testing.T) {
	v, mx := oneMX(t)
	stop := make(chan struct{})
	defer close(stop)
	mx.dataStall = func() { <-stop } // the remote stops reading
	e := v.engine(func(o *Options) { o.Timeouts.DataBlock = 200 * time.Millisecond })
	job := testJob("example.test", "a@example.test")
	line := strings.Repeat("x", 998) + "\r\n"
	job.Open = func() (io.ReadCloser, error) {
		// 64 MiB: more than loopback socket buffers hold.
		return io.NopCloser(io.LimitReader(repeatReader(line), 64<<20)), nil
	}
	start := time.Now()
	st := deliver(t, e, job)
	if d := time.Since(start); d > 8*time.Second { // filling the socket buffers takes a moment
		t.Errorf("took %v with a 200ms data block timeout", d)
	}
	wantStatus(t, st[0], 451, "4.4.2", "timeout while sending the message")
}

// repeatReader repeats s forever.
type repeatReader string

func (r repeatReader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		n += copy(p[n:], r)
	}
	return n, nil
}

func TestCancelledContextStopsDeliveryPromptly(t *testing.T) {
	v, _ := oneMX(t)
	v.route("127.0.0.2", rawServer(t, func(c net.Conn) { time.Sleep(5 * time.Second) }))
	e := v.engine(func(o *Options) { o.Timeouts.Greeting = time.Minute })
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	st := e.Deliver(ctx, testJob("example.test", "a@example.test"))
	if d := time.Since(start); d > time.Second {
		t.Errorf("Deliver took %v after its context ended", d)
	}
	wantStatus(t, st[0], 451, "4.4.2", "interrupted")
}

// A plaintext connection left by a failed handshake at level may must not
// carry a later REQUIRETLS message: a fresh connection gets TLS.
func TestConnectionReuseNeverDowngradesARequireTLSMessage(t *testing.T) {
	v, mx := oneMX(t)
	cert := v.ca.Issue(t, "mx1.example.test")
	var handshakes atomic.Int32
	mx.srv.TLSConfig = &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		if handshakes.Add(1) == 1 {
			return nil, errors.New("first handshake fails")
		}
		return &tls.Config{Certificates: []tls.Certificate{cert}}, nil
	}}
	mx.srv.EnableREQUIRETLS = true
	e := v.engine(func(o *Options) {
		o.IdleTimeout = 10 * time.Second
		o.Policy = everyMX(policy.Requirement{MXValidated: true})
	})
	wantStatus(t, deliver(t, e, testJob("example.test", "a@example.test"))[0], 250, "2.0.0")
	st := deliver(t, e, requireTLSJob())
	wantStatus(t, st[0], 250, "2.0.0")
	m := mx.messages()
	if len(m) != 2 || m[0].tls || !m[1].tls || !m[1].mail.RequireTLS {
		t.Errorf("want the first message in plaintext, the REQUIRETLS one over a new TLS connection; got %+v", m)
	}
}

// A "TLS-Required: No" message sets the MTA-STS policy aside (RFC 8689 §5):
// its session says nothing of the policy, so a TLS report must not count
// it as a success under that policy.
func TestTLSRequiredNoSessionsAreLeftOutOfReports(t *testing.T) {
	v, mx := oneMX(t)
	mx.srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{v.ca.Issue(t, "wrong.example.test")}}
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS})
	})
	job := testJob("example.test", "a@example.test")
	job.Envelope.NoTLSPolicy = true
	wantStatus(t, deliver(t, e, job)[0], 250, "2.0.0")
	got := v.rec.results()
	if len(got) == 0 {
		t.Fatal("no session result recorded")
	}
	for _, r := range got {
		if !r.Unreported {
			t.Errorf("session result %+v would be reported under the MTA-STS policy", r)
		}
	}
	// The next ordinary message is reported again.
	deliver(t, e, testJob("example.test", "b@example.test"))
	if got := v.rec.results(); got[len(got)-1].Unreported {
		t.Errorf("an ordinary message's session is left out of reports: %+v", got[len(got)-1])
	}
}

// When no host answers for the message, the log line names no host as
// the one used: not the backup that refused the connection, nor the
// primary whose TLS session could not carry the message. What each did
// is in hosts_not_used.
func TestLogNamesNoHostWhenNoneAnswered(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	mx1 := newMX(t, withTLS(v.ca.Issue(t, "mx1.example.test"))) // no SMTPUTF8
	v.route("127.0.0.2", mx1.Addr)
	v.route("127.0.0.3", v.closed)
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS})
	})
	job := testJob("example.test", "a@example.test")
	job.Envelope.SMTPUTF8 = true
	st := deliver(t, e, job)
	wantStatus(t, st[0], 451, "4.4.1", "mx1.example.test[127.0.0.2]: SMTPUTF8 not supported", "mx2.example.test[127.0.0.3]: connection refused")
	lines := attemptLines(v)
	if len(lines) != 1 {
		t.Fatalf("%d attempt lines, want 1:\n%s", len(lines), v.logs.String())
	}
	for _, want := range []string{`mx="" ip="" policy=mta-sts/verify tls=none`,
		`hosts_not_used="mx1.example.test[127.0.0.2]: SMTPUTF8 not supported, and this message needs it (RFC 6531); mx2.example.test[127.0.0.3]: connection refused"`} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("the attempt's line lacks %s:\n%s", want, lines[0])
		}
	}
	if strings.Contains(lines[0], "tls_auth=") || strings.Contains(lines[0], "cert_name=") {
		t.Errorf("the attempt's line speaks of a TLS session that carried nothing:\n%s", lines[0])
	}
}
