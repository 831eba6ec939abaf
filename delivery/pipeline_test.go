package delivery

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
)

// groupMX is a raw SMTP server that offers PIPELINING and answers nothing
// of a transaction until it has read the whole group, MAIL to DATA
// (RFC 2920 §3.1): a client that waits for the reply to MAIL waits in
// vain and times out.
type groupMX struct {
	rcpt map[string]string // reply to RCPT by address; "250 ok" otherwise
	data string            // reply to DATA; "354 go ahead" if empty
	// after421 keeps the connection open after a 421, answering 250 to
	// everything, so a client that reused it would be seen doing so.
	after421 bool
	// hangUpAfter closes each connection, silently, once it has carried
	// that many messages (0: never); rset421 answers RSET with 421.
	hangUpAfter int
	rset421     bool
	// chunking offers CHUNKING: a group then ends with BDAT, whose reply
	// is data's ("250 2.0.0 queued" if empty), and whose chunk follows at
	// once. Only "BDAT n LAST" is understood.
	chunking bool

	mu    sync.Mutex
	conns int
	// rsetLed counts RSETs that arrived with the rest of their group
	// already behind them (RFC 2920: RSET leading the group).
	rsetLed int
	verbs   []string // every command but those after MAIL in a group, in order
	groups  [][]string
	bodies  []string // as received, dot-stuffing and final dot included
}

func (m *groupMX) serve(c net.Conn) {
	m.mu.Lock()
	m.conns++
	m.mu.Unlock()
	r := bufio.NewReader(c)
	say := func(s string) { io.WriteString(c, s+"\r\n") }
	line := func() (string, bool) {
		l, err := r.ReadString('\n')
		return strings.TrimSuffix(l, "\r\n"), err == nil
	}
	say("220 mx.test ESMTP")
	broken := false
	messages := 0
	for {
		l, ok := line()
		if !ok {
			return
		}
		verb := strings.ToUpper(strings.SplitN(l, " ", 2)[0])
		m.mu.Lock()
		m.verbs = append(m.verbs, verb)
		m.mu.Unlock()
		switch {
		case broken:
			say("250 ok")
		case verb == "RSET" && m.rset421:
			say("421 4.3.2 shutting down")
			return
		case verb == "RSET" && r.Buffered() > 0:
			m.mu.Lock()
			m.rsetLed++
			m.mu.Unlock()
			say("250 ok")
		case verb == "EHLO" && m.chunking:
			say("250-mx.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n250 SIZE 1000000")
		case verb == "EHLO":
			say("250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 1000000")
		case verb == "MAIL" && m.chunking:
			if !m.chunked(l, r, say) {
				return
			}
			if messages++; m.hangUpAfter > 0 && messages >= m.hangUpAfter {
				return
			}
		case verb == "MAIL":
			group := []string{l}
			for !strings.EqualFold(l, "DATA") {
				if l, ok = line(); !ok {
					return
				}
				group = append(group, l)
			}
			m.mu.Lock()
			m.groups = append(m.groups, group)
			m.mu.Unlock()
			replies := []string{"250 2.1.0 ok"}
			for _, g := range group[1 : len(group)-1] {
				to := strings.TrimSuffix(strings.TrimPrefix(g, "RCPT TO:<"), ">")
				rep, ok := m.rcpt[to]
				if !ok {
					rep = "250 2.1.5 ok"
				}
				replies = append(replies, rep)
			}
			data := m.data
			if data == "" {
				data = "354 go ahead"
			}
			replies = append(replies, data)
			for _, rep := range replies {
				say(rep)
				if strings.HasPrefix(rep, "421") {
					if !m.after421 {
						return
					}
					broken = true
					break
				}
			}
			if broken || !strings.HasPrefix(data, "354") {
				continue
			}
			var b strings.Builder
			for {
				l, err := r.ReadString('\n')
				if err != nil {
					return
				}
				b.WriteString(l)
				if l == ".\r\n" {
					break
				}
			}
			m.mu.Lock()
			m.bodies = append(m.bodies, b.String())
			m.mu.Unlock()
			if b.String() == ".\r\n" {
				say("554 5.5.1 no valid recipients")
			} else {
				say("250 2.0.0 queued")
			}
			if messages++; m.hangUpAfter > 0 && messages >= m.hangUpAfter {
				return
			}
		case verb == "QUIT":
			say("221 bye")
			return
		default:
			say("250 ok")
		}
	}
}

// chunked reads a group that ends with "BDAT n LAST" (or DATA, which
// gets 503: a client must not fall back to it unasked), then the chunk,
// and only then answers every command in order. It returns false when
// the connection is done.
func (m *groupMX) chunked(l string, r *bufio.Reader, say func(string)) bool {
	group := []string{l}
	var size int
	for {
		var err error
		if l, err = r.ReadString('\n'); err != nil {
			return false
		}
		l = strings.TrimSuffix(l, "\r\n")
		group = append(group, l)
		if strings.EqualFold(l, "DATA") {
			break
		}
		if n, err := fmt.Sscanf(l, "BDAT %d LAST", &size); err == nil && n == 1 {
			break
		}
	}
	m.mu.Lock()
	m.groups = append(m.groups, group)
	m.mu.Unlock()
	body := make([]byte, size)
	if _, err := io.ReadFull(r, body); err != nil {
		return false
	}
	accepted := 0
	replies := []string{"250 2.1.0 ok"}
	for _, g := range group[1 : len(group)-1] {
		to := strings.TrimSuffix(strings.TrimPrefix(g, "RCPT TO:<"), ">")
		rep, ok := m.rcpt[to]
		if !ok {
			rep = "250 2.1.5 ok"
		}
		if strings.HasPrefix(rep, "2") {
			accepted++
		}
		replies = append(replies, rep)
	}
	data := m.data
	switch {
	case strings.EqualFold(l, "DATA"):
		data = "503 5.5.1 DATA after BDAT was offered"
	case accepted == 0:
		data = "554 5.5.1 no valid recipients"
	case data == "":
		data = "250 2.0.0 queued"
		m.mu.Lock()
		m.bodies = append(m.bodies, string(body))
		m.mu.Unlock()
	}
	for _, rep := range append(replies, data) {
		say(rep)
		if strings.HasPrefix(rep, "421") {
			return false
		}
	}
	return true
}

func (m *groupMX) state() (int, [][]string, []string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.conns, slices.Clone(m.groups), slices.Clone(m.bodies)
}

// RFC 2920 §3.1: MAIL, every RCPT and DATA go out before the first reply
// is read; each recipient gets its own reply's status, and the body goes
// dot-stuffed. The connection then carries a second message.
func TestPipeliningSendsTheGroupBeforeReadingReplies(t *testing.T) {
	v, _ := oneMX(t)
	mx := &groupMX{rcpt: map[string]string{
		"gone@example.test":  "550 5.1.1 no such user",
		"later@example.test": "450 4.2.1 mailbox busy",
	}}
	v.route("127.0.0.2", rawServer(t, mx.serve))
	e := v.engine(func(o *Options) { o.IdleTimeout = 5 * time.Second })
	job := testJob("example.test", "a@example.test", "gone@example.test", "later@example.test", "b@example.test")
	for range 2 {
		st := deliver(t, e, job)
		wantStatus(t, st[0], 250, "2.0.0", "queued")
		wantStatus(t, st[1], 550, "5.1.1", "no such user")
		wantStatus(t, st[2], 450, "4.2.1", "mailbox busy")
		wantStatus(t, st[3], 250, "2.0.0", "queued")
	}
	conns, groups, bodies := mx.state()
	if conns != 1 {
		t.Errorf("%d connections, want 1 carrying both messages", conns)
	}
	// Between the two messages one RSET, and no second EHLO: RSET keeps
	// the EHLO state (RFC 5321 §4.1.1.5).
	mx.mu.Lock()
	verbs := slices.Clone(mx.verbs)
	mx.mu.Unlock()
	first := slices.Index(verbs, "MAIL")
	if between := verbs[first+1:]; first < 0 || len(between) < 2 || !slices.Equal(between[:2], []string{"RSET", "MAIL"}) {
		t.Errorf("commands %q: want only RSET between the two messages", verbs)
	}
	want := []string{"MAIL FROM:<sender@sender.test> BODY=8BITMIME SIZE=" + fmt.Sprint(job.Size),
		"RCPT TO:<a@example.test>", "RCPT TO:<gone@example.test>", "RCPT TO:<later@example.test>",
		"RCPT TO:<b@example.test>", "DATA"}
	if len(groups) != 2 || !slices.Equal(groups[0], want) || !slices.Equal(groups[1], want) {
		t.Errorf("groups %q, want twice %q", groups, want)
	}
	mx.mu.Lock()
	led := mx.rsetLed
	mx.mu.Unlock()
	if led != 1 {
		t.Errorf("%d RSETs led a group, want the second message's", led)
	}
	wantBody := strings.Replace(testBody, "\r\n.leading", "\r\n..leading", 1) + ".\r\n"
	if len(bodies) != 2 || bodies[0] != wantBody {
		t.Errorf("bodies %q, want %q (dot-stuffed)", bodies, wantBody)
	}
}

// RFC 2920 §3.1: when every RCPT was refused but DATA still got 354, the
// client sends the lone "."; nothing is delivered.
func TestPipeliningAllRecipientsRefusedSendsLoneDot(t *testing.T) {
	v, _ := oneMX(t)
	mx := &groupMX{rcpt: map[string]string{
		"a@example.test": "550 5.1.1 no such user",
		"b@example.test": "451 4.3.0 try later",
	}}
	v.route("127.0.0.2", rawServer(t, mx.serve))
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test", "b@example.test"))
	wantStatus(t, st[0], 550, "5.1.1", "no such user")
	wantStatus(t, st[1], 451, "4.3.0", "try later")
	if _, _, bodies := mx.state(); !slices.Equal(bodies, []string{".\r\n"}) {
		t.Errorf("after the 354 the server read %q, want the lone dot", bodies)
	}
}

// A refused DATA (a server that follows RFC 2920's advice for a group
// without recipients) gets no body and no dot.
func TestPipeliningRefusedDataSendsNoBody(t *testing.T) {
	v, _ := oneMX(t)
	mx := &groupMX{data: "554 5.5.1 no valid recipients",
		rcpt: map[string]string{"a@example.test": "550 5.1.1 no such user"}}
	v.route("127.0.0.2", rawServer(t, mx.serve))
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 550, "5.1.1", "no such user")

	mx2 := &groupMX{data: mx.data}
	v.route("127.0.0.2", rawServer(t, mx2.serve))
	st = deliver(t, v.engine(), testJob("example.test", "a@example.test", "b@example.test"))
	for _, s := range st {
		wantStatus(t, s, 554, "5.5.1", "no valid recipients")
	}
	for _, m := range []*groupMX{mx, mx2} {
		if _, _, bodies := m.state(); len(bodies) != 0 {
			t.Errorf("the server read %q after a refused DATA", bodies)
		}
	}
}

// A 421 in the middle of the group ends the transaction: every recipient
// not refused for good is deferred with it, the body never goes, and the
// connection is not used again.
func TestPipelining421InTheGroup(t *testing.T) {
	v, _ := oneMX(t)
	mx := &groupMX{after421: true, rcpt: map[string]string{
		"gone@example.test": "550 5.1.1 no such user",
		"b@example.test":    "421 4.4.2 mx.test closing",
	}}
	v.route("127.0.0.2", rawServer(t, mx.serve))
	e := v.engine(func(o *Options) { o.IdleTimeout = 5 * time.Second })
	job := testJob("example.test", "a@example.test", "gone@example.test", "b@example.test", "c@example.test")
	for range 2 {
		st := deliver(t, e, job)
		wantStatus(t, st[0], 421, "4.4.2", "closing")
		wantStatus(t, st[1], 550, "5.1.1", "no such user")
		wantStatus(t, st[2], 421, "4.4.2", "closing")
		wantStatus(t, st[3], 421, "4.4.2", "closing")
	}
	conns, _, bodies := mx.state()
	if conns != 2 {
		t.Errorf("%d connections for two attempts, want 2: one that answered 421 was reused", conns)
	}
	if len(bodies) != 0 {
		t.Errorf("the body went after a 421: %q", bodies)
	}
}

// Without PIPELINING the client sends one command per round trip: the
// server here notes any command that arrives before it answered the one
// before.
func TestNoPipeliningIsLockStep(t *testing.T) {
	v, _ := oneMX(t)
	var mu sync.Mutex
	var early, cmds []string
	v.route("127.0.0.2", rawServer(t, func(c net.Conn) {
		r := bufio.NewReader(c)
		say := func(s string) { io.WriteString(c, s+"\r\n") }
		say("220 mx.test ESMTP")
		for {
			l, err := r.ReadString('\n')
			if err != nil {
				return
			}
			l = strings.TrimSuffix(l, "\r\n")
			// Anything already sent, or sent within a moment, is a command
			// that did not wait for this reply. (The moment can only miss
			// a pipelining client, never fail a lock-step one.)
			c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
			if _, err := r.Peek(1); err == nil {
				mu.Lock()
				early = append(early, l)
				mu.Unlock()
			}
			c.SetReadDeadline(time.Time{})
			mu.Lock()
			cmds = append(cmds, l)
			mu.Unlock()
			switch verb := strings.ToUpper(strings.SplitN(l, " ", 2)[0]); {
			case verb == "EHLO":
				say("250-mx.test\r\n250-8BITMIME\r\n250 SIZE 1000000")
			case l == "RCPT TO:<gone@example.test>":
				say("550 5.1.1 no such user")
			case verb == "DATA":
				say("354 go ahead")
				for {
					l, err := r.ReadString('\n')
					if err != nil {
						return
					}
					if l == ".\r\n" {
						break
					}
				}
				say("250 2.0.0 queued")
			case verb == "QUIT":
				say("221 bye")
				return
			default:
				say("250 ok")
			}
		}
	}))
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test", "gone@example.test", "b@example.test"))
	wantStatus(t, st[0], 250, "2.0.0", "queued")
	wantStatus(t, st[1], 550, "5.1.1")
	wantStatus(t, st[2], 250, "2.0.0", "queued")
	mu.Lock()
	defer mu.Unlock()
	if len(early) > 0 {
		t.Errorf("commands sent before the reply to %q, to a server without PIPELINING", early)
	}
	if !slices.Contains(cmds, "RCPT TO:<b@example.test>") {
		t.Errorf("commands %q", cmds)
	}
}

// The pipelined path writes exactly the lines go-smtp's Mail and Rcpt
// write on the lock-step path: SIZE, BODY, SMTPUTF8, REQUIRETLS, RET,
// ENVID, NOTIFY, ORCPT.
func TestPipelinedCommandsMatchLockStep(t *testing.T) {
	job := func() *queue.Job {
		j := testJob("example.test", "jöran@example.test", "b@example.test", "c@example.test")
		j.Envelope.SMTPUTF8, j.Envelope.Body8Bit = true, true
		j.Envelope.Ret, j.Envelope.EnvID = "FULL", "id+1 =x"
		j.Recipients[0].Notify = []string{"SUCCESS", "FAILURE"}
		j.Recipients[0].ORcpt = "utf-8;jöran@example.test"
		j.Recipients[1].Notify = []string{"NEVER"}
		j.Recipients[1].ORcpt = "rfc822;b+x=y@example.test"
		j.Recipients[2].ORcpt = `utf-8;c\x{41}@example.test` // a backslash of its own
		return j
	}
	sent := func(ehlo []string) ([]string, []string) {
		v, _ := oneMX(t)
		mx := &scriptMX{ehlo: ehlo}
		v.route("127.0.0.2", newScriptMX(t, mx))
		for _, st := range deliver(t, v.engine(), job()) {
			wantStatus(t, st, 250, "2.0.0")
		}
		cmds := mx.commands()
		mx.mu.Lock()
		defer mx.mu.Unlock()
		return cmds, slices.Clone(mx.data)
	}
	base := []string{"8BITMIME", "SMTPUTF8", "DSN", "SIZE 1000000"}
	lock, lockData := sent(base)
	piped, pipedData := sent(append([]string{"PIPELINING"}, base...))
	if !slices.Equal(lock, piped) || !slices.Equal(lockData, pipedData) {
		t.Errorf("lock-step sent\n%q\npipelined sent\n%q", lock, piped)
	}
	if !slices.Contains(piped, "MAIL FROM:<sender@sender.test> BODY=8BITMIME SIZE="+fmt.Sprint(job().Size)+" SMTPUTF8 RET=FULL ENVID=id+2B1+20+3Dx") ||
		!slices.Contains(piped, "RCPT TO:<b@example.test> NOTIFY=NEVER ORCPT=RFC822;b+2Bx+3Dy@example.test") ||
		!slices.Contains(piped, `RCPT TO:<c@example.test> ORCPT=UTF-8;c\x{5C}x{41}@example.test`) {
		t.Errorf("pipelined commands %q lack the expected parameters", piped)
	}

	// REQUIRETLS is offered, and PIPELINING taken, only after STARTTLS.
	tlsSent := func(ehloTLS []string) []string {
		v, _ := oneMX(t)
		cert := v.ca.Issue(t, "mx1.example.test")
		mx := &scriptMX{ehlo: []string{"8BITMIME"}, ehloTLS: ehloTLS, cert: &cert}
		v.route("127.0.0.2", newScriptMX(t, mx))
		e := v.engine(func(o *Options) { o.Policy = everyMX(policy.Requirement{MXValidated: true}) })
		wantStatus(t, deliver(t, e, requireTLSJob())[0], 250, "2.0.0")
		return mx.commands()
	}
	lock = tlsSent([]string{"8BITMIME", "REQUIRETLS", "DSN"})
	piped = tlsSent([]string{"PIPELINING", "8BITMIME", "REQUIRETLS", "DSN"})
	if !slices.Equal(lock, piped) || !slices.ContainsFunc(piped, func(c string) bool { return strings.HasSuffix(c, " REQUIRETLS") }) {
		t.Errorf("lock-step sent\n%q\npipelined sent\n%q", lock, piped)
	}
}

// envelopeCommands writes what go-smtp's Client writes, and refuses what
// it refuses (the engine then takes the lock-step path).
func TestEnvelopeCommandsMatchGoSMTP(t *testing.T) {
	auth := "a+b@x"
	mails := []*smtp.MailOptions{
		{},
		{Size: 1234, RequireTLS: true, UTF8: true, Return: smtp.DSNReturnHeaders, EnvelopeID: "E 1+2=3", Auth: &auth},
		{Return: "BOGUS"},
		{EnvelopeID: "bad\x01"},
	}
	rcpts := []*smtp.RcptOptions{
		{},
		{Notify: []smtp.DSNNotify{smtp.DSNNotifySuccess, smtp.DSNNotifyDelayed}, OriginalRecipientType: smtp.DSNAddressTypeRFC822, OriginalRecipient: "x+y@z"},
		{OriginalRecipientType: smtp.DSNAddressTypeUTF8, OriginalRecipient: "jö ran@z"},
		{Notify: []smtp.DSNNotify{smtp.DSNNotifySuccess, smtp.DSNNotifySuccess}},
		{Notify: []smtp.DSNNotify{smtp.DSNNotifyNever, smtp.DSNNotifyFailure}},
		{OriginalRecipientType: smtp.DSNAddressTypeRFC822, OriginalRecipient: "jö@z"},
	}
	for _, ehlo := range [][]string{
		{"8BITMIME", "SIZE", "REQUIRETLS", "SMTPUTF8", "DSN", "AUTH PLAIN"},
		{"SIZE 10", "DSN"},
		{},
	} {
		has := func(k string) bool {
			return slices.ContainsFunc(ehlo, func(e string) bool { return strings.SplitN(e, " ", 2)[0] == k })
		}
		var mu sync.Mutex
		var got []string
		addr := rawServer(t, func(c net.Conn) {
			r := bufio.NewReader(c)
			io.WriteString(c, "220 mx.test\r\n")
			for {
				l, err := r.ReadString('\n')
				if err != nil {
					return
				}
				l = strings.TrimSuffix(l, "\r\n")
				if strings.HasPrefix(l, "EHLO") {
					io.WriteString(c, "250-mx.test\r\n")
					for _, e := range ehlo {
						io.WriteString(c, "250-"+e+"\r\n")
					}
					io.WriteString(c, "250 HELP\r\n")
					continue
				}
				mu.Lock()
				got = append(got, l)
				mu.Unlock()
				io.WriteString(c, "250 ok\r\n")
			}
		})
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c := smtp.NewClient(conn)
		c.CommandTimeout = 5 * time.Second
		if err := c.Hello("relay.test"); err != nil {
			t.Fatal(err)
		}
		last := func() string {
			c.Noop() // a round trip: the line before it has been read
			mu.Lock()
			defer mu.Unlock()
			return got[len(got)-2]
		}
		for i, mo := range mails {
			want, ourErr := mailCommand(has, "s@x", mo)
			gerr := c.Mail("s@x", mo)
			switch {
			case (ourErr == nil) != (gerr == nil):
				t.Errorf("ehlo %q mail %d: go-smtp error %v, ours %v", ehlo, i, gerr, ourErr)
			case gerr == nil:
				if l := last(); l != want {
					t.Errorf("ehlo %q mail %d: go-smtp wrote %q, we %q", ehlo, i, l, want)
				}
			}
		}
		for i, ro := range rcpts {
			want, ourErr := rcptCommand(has, "r@x", ro)
			gerr := c.Rcpt("r@x", ro)
			switch {
			case (ourErr == nil) != (gerr == nil):
				t.Errorf("ehlo %q rcpt %d: go-smtp error %v, ours %v", ehlo, i, gerr, ourErr)
			case gerr == nil:
				if l := last(); l != want {
					t.Errorf("ehlo %q rcpt %d: go-smtp wrote %q, we %q", ehlo, i, l, want)
				}
			}
		}
		if _, err := mailCommand(has, "s@x\r\nRSET", &smtp.MailOptions{}); err == nil {
			t.Error("a line break in MAIL FROM was not refused")
		}
		conn.Close()
	}
}

// RFC 2920 §3.1: a group that might not fit the TCP window is not
// pipelined (groupFits); such a transaction still goes through, in
// lock-step.
func TestTooLargeAGroupIsStillDelivered(t *testing.T) {
	v, _ := oneMX(t)
	mx := &scriptMX{ehlo: []string{"PIPELINING", "8BITMIME"}}
	v.route("127.0.0.2", newScriptMX(t, mx))
	var rcpts []string
	for i := range 400 {
		rcpts = append(rcpts, fmt.Sprintf("recipient-with-a-long-local-part-%03d@example.test", i))
	}
	for _, st := range deliver(t, v.engine(), testJob("example.test", rcpts...)) {
		wantStatus(t, st, 250, "2.0.0")
	}
	group, err := envelopeCommands(func(string) (bool, string) { return true, "" }, "s@x", &smtp.MailOptions{}, testJob("example.test", rcpts...).Recipients)
	if err != nil || groupFits(group) {
		t.Errorf("a group of %d recipients fits (err %v); the test needs a larger one", len(rcpts), err)
	}
	if len(mx.commands()) < len(rcpts)+3 {
		t.Errorf("%d commands for %d recipients", len(mx.commands()), len(rcpts))
	}
}

// An idle connection the remote closed, or one that answers the RSET
// leading the group with 421, costs the message nothing: it goes out,
// whole, on a new connection in the same attempt. With BDAT the message
// was read before the group went out, and is read again from its start.
func TestStaleIdleConnectionIsReplacedWithinTheAttempt(t *testing.T) {
	for _, tc := range []struct {
		name string
		mx   *groupMX
	}{
		{"closed while idle", &groupMX{hangUpAfter: 1}},
		{"421 to RSET", &groupMX{rset421: true}},
		{"closed while idle, BDAT", &groupMX{hangUpAfter: 1, chunking: true}},
		{"421 to RSET, BDAT", &groupMX{rset421: true, chunking: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, _ := oneMX(t)
			v.route("127.0.0.2", rawServer(t, tc.mx.serve))
			e := v.engine(func(o *Options) { o.IdleTimeout = 5 * time.Second })
			for n := range 3 {
				st := deliver(t, e, testJob("example.test", "a@example.test"))
				wantStatus(t, st[0], 250, "2.0.0", "queued")
				if t.Failed() {
					t.Fatalf("message %d not delivered", n+1)
				}
			}
			conns, _, bodies := tc.mx.state()
			if conns != 3 || len(bodies) != 3 {
				t.Errorf("%d connections, %d messages; want 3 of each (one per message)", conns, len(bodies))
			}
			for i, b := range bodies {
				if !strings.Contains(b, "Subject: test\r\n\r\nHello.\r\n") {
					t.Errorf("message %d arrived as %q", i+1, b)
				}
			}
		})
	}
}

// A NOTIFY list that is not what RFC 3461 §4.1 allows is not passed on
// (the message still goes, without it), never written as go-smtp would
// refuse to write it.
func TestValidNotify(t *testing.T) {
	for _, tc := range []struct {
		in   []string
		want int // values passed on; 0: none
	}{
		{[]string{"SUCCESS", "failure"}, 2},
		{[]string{"NEVER"}, 1},
		{[]string{"SUCCESS", "SUCCESS"}, 0},
		{[]string{"NEVER", "FAILURE"}, 0},
		{[]string{"SOMETIMES"}, 0},
	} {
		if got := validNotify(tc.in); len(got) != tc.want {
			t.Errorf("validNotify(%q) = %q, want %d values", tc.in, got, tc.want)
		}
	}
}

// A remote without STARTTLS, or one that refuses it, keeps the state of
// our first EHLO: the session says EHLO once, not again through go-smtp.
func TestPlaintextSessionSaysEHLOOnce(t *testing.T) {
	for _, refuse := range []bool{false, true} {
		v, _ := oneMX(t)
		var mu sync.Mutex
		var verbs []string
		v.route("127.0.0.2", rawServer(t, func(c net.Conn) {
			r := bufio.NewReader(c)
			say := func(s string) { io.WriteString(c, s+"\r\n") }
			say("220 mx.test ESMTP")
			for {
				l, err := r.ReadString('\n')
				if err != nil {
					return
				}
				verb := strings.ToUpper(strings.Fields(l + " x")[0])
				mu.Lock()
				verbs = append(verbs, verb)
				mu.Unlock()
				switch verb {
				case "EHLO":
					if refuse {
						say("250-mx.test\r\n250-starttls\r\n250 size 1000000")
					} else {
						say("250-mx.test\r\n250 size 1000000")
					}
				case "STARTTLS":
					say("454 4.7.0 TLS not available")
				case "DATA":
					say("354 go ahead")
					for {
						if l, err := r.ReadString('\n'); err != nil || l == ".\r\n" {
							break
						}
					}
					say("250 2.0.0 queued")
				case "QUIT":
					say("221 bye")
					return
				default:
					say("250 ok")
				}
			}
		}))
		st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))
		wantStatus(t, st[0], 250, "2.0.0")
		mu.Lock()
		got := slices.Clone(verbs)
		mu.Unlock()
		want := []string{"EHLO", "MAIL", "RCPT", "DATA"}
		if refuse {
			want = []string{"EHLO", "STARTTLS", "MAIL", "RCPT", "DATA"}
		}
		if len(got) < len(want) || !slices.Equal(got[:len(want)], want) {
			t.Errorf("STARTTLS refused %v: commands %q, want %q first", refuse, got, want)
		}
	}
}

// dialogue serves each connection a greeting, then hands each command to
// answer, which writes the reply and returns false to end the connection.
func dialogue(t *testing.T, answer func(c net.Conn, r *bufio.Reader, verb string, f []string) bool) string {
	return rawServer(t, func(c net.Conn) {
		r := bufio.NewReader(c)
		io.WriteString(c, "220 mx.test ESMTP\r\n")
		for {
			line, err := r.ReadString('\n')
			f := strings.Fields(line)
			if err != nil || len(f) == 0 || !answer(c, r, strings.ToUpper(f[0]), f) {
				return
			}
		}
	})
}

// otherwise answers what a dialogue leaves: QUIT ends it, anything else
// is taken.
func otherwise(c net.Conn, verb string) bool {
	if verb == "QUIT" {
		io.WriteString(c, "221 bye\r\n")
		return false
	}
	io.WriteString(c, "250 ok\r\n")
	return true
}

// readDot reads a DATA body up to its final dot.
func readDot(r *bufio.Reader) bool {
	for {
		l, err := r.ReadString('\n')
		if err != nil {
			return false
		}
		if l == ".\r\n" {
			return true
		}
	}
}

// A server that sends one reply too many (two to MAIL) puts every later
// reply of the group one command off: the reply read as BDAT's or as the
// final dot's is RCPT's, and the refusal after it the message's. The
// transaction's outcome is unknown, so the message is deferred, never
// counted delivered, and the connection not reused. A 421 after the last
// reply (a server closing) is no such thing.
//
// The client sees the reply too many only once it has come: here the
// BDAT group's replies go out in one write, as a server answering a
// pipelined group does (RFC 2920 §3.2). One that came later than the
// client's look would go unseen; no client can wait for a reply that is
// not due.
func TestOneReplyTooManyIsNeverTakenForDelivery(t *testing.T) {
	for _, tc := range []struct {
		name, ehlo string
		delivered  bool
	}{
		{"BDAT", "250-mx.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n", false},
		{"DATA", "250-mx.test\r\n250 PIPELINING\r\n", false},
		{"a 421 after the last reply", "250-mx.test\r\n250 PIPELINING\r\n", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, _ := oneMX(t)
			bdat := tc.name == "BDAT"
			held := "" // BDAT's group: MAIL's and RCPT's replies, sent with BDAT's
			v.route("127.0.0.2", dialogue(t, func(c net.Conn, r *bufio.Reader, verb string, f []string) bool {
				switch verb {
				case "EHLO":
					io.WriteString(c, tc.ehlo)
				case "MAIL":
					switch {
					case tc.delivered:
						io.WriteString(c, "250 ok\r\n")
					case bdat:
						held = "250 ok\r\n250 ok again\r\n"
					default:
						io.WriteString(c, "250 ok\r\n250 ok again\r\n")
					}
				case "RCPT":
					if !bdat {
						return otherwise(c, verb)
					}
					held += "250 ok\r\n"
				case "DATA":
					io.WriteString(c, "354 go on\r\n")
					if !readDot(r) {
						return false
					}
					if tc.delivered {
						io.WriteString(c, "250 queued\r\n421 closing\r\n")
						return false
					}
					io.WriteString(c, "554 5.7.1 refused\r\n")
				case "BDAT":
					n, _ := strconv.Atoi(f[1])
					io.CopyN(io.Discard, r, int64(n))
					io.WriteString(c, held+"554 5.7.1 refused\r\n")
				default:
					return otherwise(c, verb)
				}
				return true
			}))
			st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))[0]
			if tc.delivered {
				wantStatus(t, st, 250, "2.0.0")
				return
			}
			if st.Delivered() || st.Permanent() {
				t.Fatalf("status %q, want a deferral: the outcome is unknown", st)
			}
			if tc.name == "BDAT" && !strings.Contains(st.Text, "more replies than commands") {
				// (DATA's path sees it at DATA: a 250 where 354 is due.)
				t.Errorf("status %q does not say why", st)
			}
		})
	}
}

// QUIT waits no longer than the short QUIT bound, whatever the step
// before it allowed: go-smtp set QUIT's deadline from the last step's
// timeout (DATA's, minutes by default), so a remote that never answers
// QUIT held the worker and the connection slot that long.
func TestQuitThatIsNeverAnsweredEndsSoon(t *testing.T) {
	v, _ := oneMX(t)
	quit := make(chan struct{})
	v.route("127.0.0.2", dialogue(t, func(c net.Conn, r *bufio.Reader, verb string, f []string) bool {
		switch verb {
		case "DATA":
			io.WriteString(c, "354 go on\r\n")
			if !readDot(r) {
				return false
			}
			io.WriteString(c, "250 queued\r\n")
		case "QUIT":
			close(quit)
			r.ReadString('\n') // never answered; ends when the client closes
			return false
		default:
			return otherwise(c, verb)
		}
		return true
	}))
	e := v.engine(func(o *Options) {
		o.Timeouts.Command, o.Timeouts.DataInit, o.Timeouts.DataFinal = 100*time.Millisecond, time.Minute, time.Minute
		o.Limits = []Limit{{Domains: []string{"example.test"}, Shaping: Shaping{MaxMessagesPerConn: 1}}}
	})
	start := time.Now()
	wantStatus(t, deliver(t, e, testJob("example.test", "a@example.test"))[0], 250, "2.0.0")
	<-quit
	if d := time.Since(start); d > 30*time.Second {
		t.Errorf("the delivery took %v: QUIT waited for the DATA step's minute", d)
	}
}

// A reply that is no refusal where one was due (a 250 to DATA) leaves
// the remote in a state nobody knows: the connection is not reused.
func TestConnectionThatRepliedOutOfTurnIsNotReused(t *testing.T) {
	for _, pipelining := range []bool{false, true} {
		t.Run(fmt.Sprintf("pipelining %v", pipelining), func(t *testing.T) {
			v, _ := oneMX(t)
			var mu sync.Mutex
			conns := 0
			v.route("127.0.0.2", dialogue(t, func(c net.Conn, r *bufio.Reader, verb string, f []string) bool {
				switch verb {
				case "EHLO":
					mu.Lock()
					conns++
					mu.Unlock()
					if pipelining {
						io.WriteString(c, "250-mx.test\r\n250 PIPELINING\r\n")
					} else {
						io.WriteString(c, "250 mx.test\r\n")
					}
				case "DATA":
					mu.Lock()
					first := conns == 1
					mu.Unlock()
					if first {
						io.WriteString(c, "250 what data\r\n")
						return true
					}
					io.WriteString(c, "354 go on\r\n")
					if !readDot(r) {
						return false
					}
					io.WriteString(c, "250 queued\r\n")
				default:
					return otherwise(c, verb)
				}
				return true
			}))
			e := v.engine(func(o *Options) { o.IdleTimeout = 5 * time.Second }) // connections are kept
			st := deliver(t, e, testJob("example.test", "a@example.test"))[0]
			if st.Delivered() || st.Permanent() {
				t.Fatalf("first message: %q, want a deferral", st)
			}
			wantStatus(t, deliver(t, e, testJob("example.test", "b@example.test"))[0], 250, "2.0.0")
			mu.Lock()
			defer mu.Unlock()
			if conns != 2 {
				t.Errorf("%d connections, want a new one after the reply out of turn", conns)
			}
		})
	}
}

// A multiline reply whose last line has another code than the lines
// before it breaks RFC 5321 §4.2.1, and such servers exist. Its last line
// ends it, as Postfix reads it: read on, as textproto does, and the next
// reply's lines become this one's, every later reply of a pipelined group
// is one command off, and the reply the relay waits for last never
// comes, while the remote has taken the message.
func TestMultilineReplyEndsAtItsLastLineWhateverItsCode(t *testing.T) {
	for _, tc := range []struct {
		name, ehlo string
	}{
		{"BDAT", "250-mx.test\r\n250-PIPELINING\r\n250 CHUNKING\r\n"},
		{"DATA", "250-mx.test\r\n250 PIPELINING\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, _ := oneMX(t)
			held := "" // BDAT's group: MAIL's and RCPT's replies, sent with BDAT's
			v.route("127.0.0.2", dialogue(t, func(c net.Conn, r *bufio.Reader, verb string, f []string) bool {
				const (
					mail = "251-2.1.0 one code\r\n250 2.1.0 and another: sender ok\r\n"
					rcpt = "250-2.1.5 one code\r\n251 2.1.5 and another: will forward\r\n"
				)
				switch verb {
				case "EHLO":
					io.WriteString(c, tc.ehlo)
				case "MAIL":
					if tc.name == "BDAT" {
						held = mail
					} else {
						io.WriteString(c, mail)
					}
				case "RCPT":
					if tc.name == "BDAT" {
						held += rcpt
					} else {
						io.WriteString(c, rcpt)
					}
				case "DATA":
					io.WriteString(c, "354 go on\r\n")
					if !readDot(r) {
						return false
					}
					io.WriteString(c, "250 2.0.0 queued as D\r\n")
				case "BDAT":
					n, _ := strconv.Atoi(f[1])
					io.CopyN(io.Discard, r, int64(n))
					io.WriteString(c, held+"250 2.0.0 queued as B\r\n")
				default:
					return otherwise(c, verb)
				}
				return true
			}))
			st := deliver(t, v.engine(), testJob("example.test", "a@example.test"))[0]
			wantStatus(t, st, 250, "2.0.0")
			if !strings.Contains(st.Text, "queued as") {
				t.Errorf("status %q: not the message's own reply", st)
			}
		})
	}
}
