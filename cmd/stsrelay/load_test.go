package main

// The load harness of the reliability tests (reliability_test.go,
// soak_test.go): a go-smtp sink on a free loopback port, where routes send
// every load domain, that records every recipient it accepted, with the relay's lifetime ("epoch") in which it
// did; submitters that tag each message and remember what the relay
// answered; and the checks that compare the two.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/internal/dnstest"
)

// Destination domains of the load, all served by one sink. What the sink
// does with each decides what the relay must do.
const (
	domainDefer = "defer.test" // RCPT always 451: stays queued for good
	domainFlaky = "flaky.test" // the first attempt of each recipient gets 451, the retry 250
	domainStall = "stall.test" // the final reply never comes while the sink stalls
)

var okDomains = []string{"ok0.test", "ok1.test", "ok2.test", "ok3.test"}

// loadDomains are every domain the sink serves.
func loadDomains() []string {
	return append(slices.Clone(okDomains), domainDefer, domainFlaky, domainStall)
}

// loadRoutes are the [[delivery.route]] entries that send every load
// domain to its own port of the sink, so that each has its own connection
// limit, as each domain's MX hosts would (stall.test holding all its
// connections must not hold up the others).
func loadRoutes(k *loadSink) string {
	var b strings.Builder
	for _, d := range loadDomains() {
		fmt.Fprintf(&b, "[[delivery.route]]\ndomains = [%q]\nnexthop = \"[127.0.0.1]:%d\"\n", d, k.ports[d])
	}
	return b.String()
}

// loadSink is a go-smtp server on free loopback ports, one per load
// domain, that records each accepted recipient with the epoch it came in.
type loadSink struct {
	srv   *smtp.Server
	ports map[string]int // domain → port

	mu      sync.Mutex
	got     map[string][]int // recipient → epoch of each delivery
	corrupt []string
	epoch   int
	active  int // open sessions
	idle    *sync.Cond
	stall   chan struct{} // nil: answer at once; else hold final replies to stall.test until closed
	stalled int           // final replies held so far

	tried map[string]bool // flaky.test recipients deferred once
}

func startLoadSink(t *testing.T) *loadSink {
	t.Helper()
	k := &loadSink{got: make(map[string][]int), tried: make(map[string]bool), ports: make(map[string]int)}
	k.idle = sync.NewCond(&k.mu)
	s := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		k.mu.Lock()
		k.active++
		k.mu.Unlock()
		return &loadSession{sink: k}, nil
	}))
	s.Domain = "sink.test"
	s.MaxRecipients = 0
	s.MaxMessageBytes = 64 << 20
	s.ErrorLog = log.New(io.Discard, "", 0) // every kill resets dozens of sessions
	for _, d := range loadDomains() {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		go s.Serve(ln)
		k.ports[d] = ln.Addr().(*net.TCPAddr).Port
	}
	k.srv = s
	t.Cleanup(func() {
		k.release()
		s.Close()
	})
	return k
}

// nextEpoch waits until every session of the relay that just died has
// ended, so that what the sink records from now on belongs to the next one.
func (k *loadSink) nextEpoch(t *testing.T) int {
	t.Helper()
	done := make(chan struct{})
	go func() {
		k.mu.Lock()
		for k.active > 0 {
			k.idle.Wait()
		}
		k.epoch++
		k.mu.Unlock()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("sink sessions of a dead relay still open after 30s")
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.epoch
}

// holdStalled makes the sink hold final replies to stall.test.
func (k *loadSink) holdStalled() {
	k.mu.Lock()
	k.stall = make(chan struct{})
	k.mu.Unlock()
}

// release answers held final replies with 451 and stops holding.
func (k *loadSink) release() {
	k.mu.Lock()
	if k.stall != nil {
		close(k.stall)
		k.stall = nil
	}
	k.mu.Unlock()
}

func (k *loadSink) stalledCount() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.stalled
}

// snapshot returns a copy of what was delivered.
func (k *loadSink) snapshot() (got map[string][]int, corrupt []string) {
	k.mu.Lock()
	defer k.mu.Unlock()
	got = make(map[string][]int, len(k.got))
	for r, e := range k.got {
		got[r] = slices.Clone(e)
	}
	return got, slices.Clone(k.corrupt)
}

func (k *loadSink) delivered() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	n := 0
	for _, e := range k.got {
		n += len(e)
	}
	return n
}

type loadSession struct {
	sink  *loadSink
	rcpts []string
}

func (s *loadSession) Reset() { s.rcpts = nil }

func (s *loadSession) Logout() error {
	k := s.sink
	k.mu.Lock()
	k.active--
	k.idle.Broadcast()
	k.mu.Unlock()
	return nil
}

func (s *loadSession) Mail(string, *smtp.MailOptions) error { return nil }

func (s *loadSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	if strings.HasSuffix(to, "@"+domainDefer) {
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 2, 1}, Message: "Mailbox busy, try again later"}
	}
	s.rcpts = append(s.rcpts, to)
	return nil
}

func (s *loadSession) Data(r io.Reader) error {
	body, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	k := s.sink
	domain := s.rcpts[0][strings.LastIndexByte(s.rcpts[0], '@')+1:]
	switch domain {
	case domainFlaky:
		// Deferred while any recipient is new: per-recipient retry times
		// (the queue's jitter) may split a message's recipients later.
		k.mu.Lock()
		retry := true
		for _, rc := range s.rcpts {
			retry = retry && k.tried[rc]
			k.tried[rc] = true
		}
		k.mu.Unlock()
		if !retry {
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "Temporary local problem, try again"}
		}
	case domainStall:
		k.mu.Lock()
		stall := k.stall
		if stall != nil {
			k.stalled++
		}
		k.mu.Unlock()
		if stall != nil {
			<-stall // the relay gives up and closes first; this reply is lost
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "Stalled"}
		}
	}
	id, ok := checkLoadBody(body)
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, rc := range s.rcpts {
		if !ok || !strings.HasPrefix(rc, "r"+id+"-") {
			k.corrupt = append(k.corrupt, rc)
		}
		k.got[rc] = append(k.got[rc], k.epoch)
	}
	return nil
}

// loadMessage returns message n: its recipients (unique to n, so the
// relay's log lines name the message by them) and its text, whose payload
// a header checksums.
func loadMessage(n int, domains func(n int) []string) (rcpts []string, body []byte) {
	for i, d := range domains(n) {
		rcpts = append(rcpts, fmt.Sprintf("r%d-%d@%s", n, i, d))
	}
	lines := 5 + rand.IntN(150)
	if n%250 == 0 {
		lines = 12000 // over 256 KB: a spool file of its own
	}
	payload := strings.Repeat(fmt.Sprintf("line %d of a test message, with some text to make it longer\r\n", n), lines)
	return rcpts, fmt.Appendf(nil, "Subject: load %d\r\nX-Test-ID: %d\r\nX-Check: %x\r\n\r\n%s",
		n, n, sha256.Sum256([]byte(payload)), payload)
}

// checkLoadBody returns the message's X-Test-ID, and whether the payload
// is the one its checksum names.
func checkLoadBody(b []byte) (string, bool) {
	h, payload, ok := bytes.Cut(b, []byte("\r\n\r\n"))
	if !ok {
		return "", false
	}
	m := regexp.MustCompile(`(?m)^X-Test-ID: (\d+)\r$`).FindSubmatch(h)
	if m == nil {
		return "", false
	}
	return string(m[1]), bytes.Contains(h, fmt.Appendf(nil, "X-Check: %x", sha256.Sum256(payload)))
}

// mixedDomains sends most mail to domains that accept it, some to the
// flaky and the deferring one, up to three recipient domains a message.
func mixedDomains(n int) []string {
	var ds []string
	for range 1 + rand.IntN(3) {
		switch x := rand.IntN(20); {
		case x < 2:
			ds = append(ds, domainDefer)
		case x < 5:
			ds = append(ds, domainFlaky)
		default:
			ds = append(ds, okDomains[rand.IntN(len(okDomains))])
		}
	}
	return ds
}

// loadGen submits numbered messages from several connections and records
// what became of each.
type loadGen struct {
	addr    string
	domains func(n int) []string
	pace    <-chan time.Time // nil: as fast as the relay takes them

	next atomic.Int64
	mu   sync.Mutex
	// acked got 250 with a queue id; rejected got another reply; inDoubt
	// lost the connection after the final dot was sent, so the relay may
	// or may not have stored it; unsent lost it before.
	acked    map[int][]string
	ackedAt  map[int]time.Time
	rejected map[int][]string
	inDoubt  map[int][]string
	unsent   map[int][]string
	replies  map[string]int // "452 4.3.1" → count, for every non-250 reply
	wg       sync.WaitGroup
	cancel   context.CancelFunc
}

func newLoadGen(addr string, domains func(int) []string) *loadGen {
	return &loadGen{
		addr: addr, domains: domains,
		acked: map[int][]string{}, ackedAt: map[int]time.Time{}, rejected: map[int][]string{},
		inDoubt: map[int][]string{}, unsent: map[int][]string{}, replies: map[string]int{},
	}
}

// start runs workers submitters until stop.
func (g *loadGen) start(workers int) {
	ctx, cancel := context.WithCancel(context.Background())
	g.cancel = cancel
	for range workers {
		g.wg.Go(func() { g.work(ctx) })
	}
}

func (g *loadGen) stop() {
	g.cancel()
	g.wg.Wait()
}

func (g *loadGen) work(ctx context.Context) {
	var c *smtp.Client
	defer func() {
		if c != nil {
			c.Close()
		}
	}()
	for ctx.Err() == nil {
		if g.pace != nil {
			select {
			case <-g.pace:
			case <-ctx.Done():
				return
			}
		}
		for c == nil && ctx.Err() == nil {
			var err error
			if c, err = smtp.Dial(g.addr); err != nil {
				c = nil
				time.Sleep(20 * time.Millisecond) // the relay is restarting
			}
		}
		if c == nil {
			return
		}
		n := int(g.next.Add(1))
		rcpts, body := loadMessage(n, g.domains)
		if !g.send(c, n, rcpts, body) {
			c.Close()
			c = nil
		}
	}
}

// send submits one message on c and records the outcome; false means c
// is no longer usable.
func (g *loadGen) send(c *smtp.Client, n int, rcpts []string, body []byte) bool {
	record := func(m map[int][]string, reply string) {
		g.mu.Lock()
		defer g.mu.Unlock()
		m[n] = rcpts
		if reply != "" {
			g.replies[reply]++
		}
	}
	fail := func(err error) bool {
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			record(g.rejected, fmt.Sprintf("%d %d.%d.%d", se.Code, se.EnhancedCode[0], se.EnhancedCode[1], se.EnhancedCode[2]))
			return false // start afresh: after 421 the relay hangs up anyway
		}
		record(g.unsent, "")
		return false
	}
	if err := c.Mail("load@sender.test", nil); err != nil {
		return fail(err)
	}
	for _, r := range rcpts {
		if err := c.Rcpt(r, nil); err != nil {
			return fail(err)
		}
	}
	w, err := c.Data()
	if err != nil {
		return fail(err)
	}
	if _, err := w.Write(body); err != nil {
		record(g.unsent, "")
		return false
	}
	resp, err := w.CloseWithResponse()
	if err != nil {
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			return fail(err)
		}
		record(g.inDoubt, "") // the final dot may have reached the relay
		return false
	}
	if !strings.Contains(resp.StatusText, "queued as ") {
		record(g.inDoubt, "unexpected 250 text")
		return false
	}
	g.mu.Lock()
	g.acked[n] = rcpts
	g.ackedAt[n] = time.Now()
	g.mu.Unlock()
	return true
}

func (g *loadGen) ackedCount() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.acked)
}

func (g *loadGen) replyCount(reply string) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.replies[reply]
}

// queuedRecipients lists the recipients of the messages in the relay's
// queue through the CLI, address → state (delivered ones too, while a
// message has others pending).
func queuedRecipients(t *testing.T, config string) map[string]string {
	t.Helper()
	code, out, errOut := stsrelay(t, "", "queue", "list", "-json", "-config", config)
	if code != 0 {
		t.Fatalf("queue list: %s", errOut)
	}
	var msgs []struct {
		Recipients []recipient `json:"recipients"`
	}
	if err := json.Unmarshal([]byte(out), &msgs); err != nil {
		t.Fatalf("queue list -json: %v", err)
	}
	q := map[string]string{}
	for _, m := range msgs {
		for _, r := range m.Recipients {
			q[r.Address] = r.State
		}
	}
	return q
}

func pending(state string) bool {
	return state == "queued" || state == "deferred" || state == "held"
}

// committedDelivered returns the recipients a relay's log says it recorded
// as delivered: the queue logs "recipients updated" after the commit.
func committedDelivered(log string) map[string]bool {
	out := map[string]bool{}
	sc := bufio.NewScanner(strings.NewReader(log))
	sc.Buffer(nil, 1<<20)
	re := regexp.MustCompile(`msg="recipients updated" .*recipients=(\S+) outcome=delivered`)
	for sc.Scan() {
		if m := re.FindStringSubmatch(sc.Text()); m != nil {
			for _, r := range strings.Split(m[1], ",") {
				out[r] = true
			}
		}
	}
	return out
}

// loadReport is what a reliability run found.
type loadReport struct {
	acked, ackedRcpts, rejected, inDoubt, unsent int
	delivered, stillQueued, lost                 int // acknowledged recipients
	inDoubtDelivered                             int // messages
	duplicates                                   int // deliveries beyond the first
}

func (r loadReport) String() string {
	return fmt.Sprintf("%d messages acknowledged (%d recipients: %d delivered, %d still queued, %d lost), %d refused with a reply, "+
		"%d cut off before the final dot, %d cut off after it (%d of those delivered), %d duplicate deliveries",
		r.acked, r.ackedRcpts, r.delivered, r.stillQueued, r.lost, r.rejected, r.unsent, r.inDoubt, r.inDoubtDelivered, r.duplicates)
}

// verifyLoad checks what the sink received against what the submitters
// were told, the relay's final queue and the logs of each relay lifetime
// (logs[e] is the log of epoch e; killed[e] says it ended in SIGKILL):
//   - every acknowledged recipient was delivered, or is still queued;
//   - no recipient of a message refused with a reply, or cut off before
//     its final dot, was ever delivered or queued;
//   - every body arrived intact;
//   - a recipient delivered more than once was cut off: each copy but the
//     last came in a lifetime that ended in SIGKILL before the relay had
//     recorded the delivery, and no lifetime delivered it twice (unless
//     unrecorded is set: with the disk full, a delivery whose outcome
//     could not be written is retried, and the relay must say so).
func verifyLoad(t *testing.T, g *loadGen, k *loadSink, queued map[string]string, logs []string, killed []bool, unrecorded bool) loadReport {
	t.Helper()
	got, corrupt := k.snapshot()
	g.mu.Lock()
	defer g.mu.Unlock()
	var rep loadReport
	rep.acked, rep.rejected, rep.inDoubt, rep.unsent = len(g.acked), len(g.rejected), len(g.inDoubt), len(g.unsent)
	for _, rc := range corrupt {
		t.Errorf("%s: delivered a damaged or foreign body", rc)
	}
	known := map[string]bool{}
	for _, rcpts := range g.acked {
		for _, rc := range rcpts {
			known[rc] = true
			rep.ackedRcpts++
			switch {
			case len(got[rc]) > 0:
				rep.delivered++
			case pending(queued[rc]):
				rep.stillQueued++
			default:
				rep.lost++
				t.Errorf("%s: acknowledged with 250, never delivered and no longer queued", rc)
			}
		}
	}
	for _, set := range []map[int][]string{g.rejected, g.unsent} {
		for n, rcpts := range set {
			for _, rc := range rcpts {
				if len(got[rc]) > 0 || queued[rc] != "" {
					t.Errorf("message %d (%s) never got a 250, yet was delivered %d times (queued: %q)", n, rc, len(got[rc]), queued[rc])
				}
			}
		}
	}
	for _, rcpts := range g.inDoubt {
		delivered := false
		for _, rc := range rcpts {
			known[rc] = true
			delivered = delivered || len(got[rc]) > 0
		}
		if delivered {
			rep.inDoubtDelivered++
		}
	}
	for rc := range queued {
		if !known[rc] && !strings.HasPrefix(rc, "load@") {
			t.Errorf("the queue holds %s, which no submission was told it accepted", rc)
		}
	}
	committed := make([]map[string]bool, len(logs))
	for e, l := range logs {
		committed[e] = committedDelivered(l)
	}
	for rc, epochs := range got {
		if !known[rc] {
			t.Errorf("%s delivered, but its submission never got a 250 nor was cut off after the final dot", rc)
		}
		rep.duplicates += len(epochs) - 1
		for i, e := range epochs[:len(epochs)-1] {
			switch {
			case e == epochs[i+1] && unrecorded && strings.Contains(logs[e], "cannot record delivery outcome"):
			case e == epochs[i+1]:
				t.Errorf("%s delivered twice by one relay lifetime (epoch %d)", rc, e)
			case e >= len(killed) || !killed[e]:
				t.Errorf("%s delivered again after epoch %d, which did not end in SIGKILL", rc, e)
			case committed[e][rc]:
				t.Errorf("%s delivered again although epoch %d had recorded its delivery", rc, e)
			}
		}
	}
	return rep
}

// freePort returns a loopback address that was free a moment ago, for
// listeners that must keep their port across restarts.
func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// writeLoadConfig writes the configuration of a relay under load:
// submission on a fixed port (it survives restarts), routes to the sink,
// quick retries, a DNS server of its own (nothing leaves loopback). level
// is debug where the checks read the "recipients updated" lines.
func writeLoadConfig(t *testing.T, dir, stateDir, listen string, k *loadSink, level, extra string) string {
	t.Helper()
	dns := dnstest.New(t)
	p := filepath.Join(dir, "config.toml")
	text := `hostname = "relay.test"
state_dir = ` + strconv.Quote(stateDir) + `
[log]
level = ` + strconv.Quote(level) + `
[submission]
listen = ` + strconv.Quote(listen) + `
trusted_networks = ["127.0.0.0/8"]
[dns]
resolver = ` + strconv.Quote(dns.Addr) + `
timeout = "2s"
[delivery]
# flaky.test is retried a second after its deferral; defer.test, which
# never accepts, only every minute after that.
retry_schedule = ["1s", "1m"]
connect_timeout = "5s"
ip_version = "4"
` + loadRoutes(k) + extra
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// requireRootTo is requireRoot for tests that need root for another
// reason than ports 25 and 443; why completes "needs root to …".
func requireRootTo(t *testing.T, why string) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("this test needs root to %s and must run as root in CI", why)
	}
	t.Skipf("needs root to %s; CI runs it as root", why)
}

// openToOthers makes dir and the directories t.TempDir made above it
// searchable and readable by other users (never os.TempDir itself or
// anything above it).
func openToOthers(t *testing.T, dir string) {
	t.Helper()
	top := filepath.Clean(os.TempDir())
	for p := filepath.Clean(dir); strings.HasPrefix(p, top+string(filepath.Separator)); p = filepath.Dir(p) {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

// waitUntil polls cond until it holds, failing after a minute.
func waitUntil(t *testing.T, d *daemon, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within a minute: %s\nrelay log (tail):\n%s", what, tail(d.output(), 40))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitLoaded waits until the relay is up and its queue loaded (logged by
// the queue's own goroutine, in either order with the start line).
func waitLoaded(t *testing.T, d *daemon) {
	t.Helper()
	d.waitFor(`stsrelay started|msg="queue loaded"`)
	for !strings.Contains(d.output(), "stsrelay started") || !strings.Contains(d.output(), `msg="queue loaded"`) {
		select {
		case err := <-d.exited:
			d.exited <- err
			t.Fatalf("relay exited (%v) during start:\n%s", err, d.output())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// waitDelivered waits until every recipient acknowledged after since whose
// domain accepts mail has reached the sink.
func waitDelivered(t *testing.T, g *loadGen, k *loadSink, since time.Time, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got, _ := k.snapshot()
		g.mu.Lock()
		missing := 0
		var example string
		for n, rcpts := range g.acked {
			if g.ackedAt[n].Before(since) {
				continue
			}
			for _, rc := range rcpts {
				if !strings.HasSuffix(rc, "@"+domainDefer) && len(got[rc]) == 0 {
					missing++
					example = rc
				}
			}
		}
		g.mu.Unlock()
		if missing == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d acknowledged recipients not delivered after %s (for example %s)", missing, timeout, example)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
