package main

// Operating the relay as a postmaster would: the queue commands with and
// without a daemon, bulk selections, the stored message, the summary, the
// retry schedule, log lines, start-up warnings and usage errors, all
// through the binary.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"
	"golang.org/x/sys/unix"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/queue"
)

// queueCmd runs `stsrelay queue <sub> -config config args…`.
func queueCmd(t *testing.T, config, sub string, args ...string) (int, string, string) {
	t.Helper()
	return stsrelay(t, "", append([]string{"queue", sub, "-config", config}, args...)...)
}

// deferredID submits a message to rcpt and returns its queue id once its
// first attempt was deferred (the test resolver does not answer).
func deferredID(t *testing.T, d *daemon, addr, from, rcpt, body string) string {
	t.Helper()
	submit(t, addr, from, rcpt, body)
	line := d.waitFor(`recipients updated.*recipients=` + regexp.QuoteMeta(rcpt) + `.*outcome=deferred`)
	return regexp.MustCompile(` id=(\S+)`).FindStringSubmatch(line)[1]
}

const onDisk = "daemon not running, showing the queue on disk"

func TestQueueListShowAndSummaryReadTheDiskWithoutADaemon(t *testing.T) {
	dir := t.TempDir()
	config := writeConfig(t, dir, configParts{tail: "[delivery]\nretry_schedule = [\"1h\"]\n"})

	// No daemon has ever run here: an empty queue, said so.
	code, out, errOut := queueCmd(t, config, "list")
	if code != 0 || out != "The queue is empty.\n" || !strings.Contains(errOut, onDisk) {
		t.Fatalf("list before any daemon: exit %d, %q, %q", code, out, errOut)
	}

	d := startDaemon(t, config)
	addr := d.submissionAddr()
	body := "Message-ID: <ops.1@app.example>\r\nSubject: stuck\r\n\r\nthe body line\r\n"
	id := deferredID(t, d, addr, "app@example.com", "user@example.net", body)
	showBody := func() string {
		t.Helper()
		code, out, errOut := queueCmd(t, config, "show", "-body", id)
		if code != 0 {
			t.Fatalf("show -body: exit %d: %s", code, errOut)
		}
		return out
	}
	fromDaemon := showBody()
	if code, _, errOut := queueCmd(t, config, "list"); code != 0 || strings.Contains(errOut, onDisk) {
		t.Fatalf("list with a daemon: exit %d, %q", code, errOut)
	}
	if code := d.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("exit %d", code)
	}

	code, out, errOut = queueCmd(t, config, "list")
	if code != 0 || !strings.Contains(out, id) || !strings.Contains(out, "<ops.1@app.example>") ||
		!strings.Contains(out, "user@example.net  deferred") || !strings.Contains(errOut, onDisk) {
		t.Fatalf("list on disk: exit %d\n%s\n%s", code, out, errOut)
	}
	code, out, _ = queueCmd(t, config, "list", "-json")
	var list []struct {
		ID        string `json:"id"`
		MessageID string `json:"message_id"`
	}
	if err := json.Unmarshal([]byte(out), &list); code != 0 || err != nil || len(list) != 1 || list[0].MessageID != "<ops.1@app.example>" {
		t.Fatalf("list -json on disk: exit %d, %v\n%s", code, err, out)
	}
	if code, out, _ := queueCmd(t, config, "show", id); code != 0 || !strings.Contains(out, "message-id: <ops.1@app.example>") ||
		!strings.Contains(out, "Subject: stuck") {
		t.Fatalf("show on disk: exit %d\n%s", code, out)
	}
	// -body prints the stored message as postcat does: our Received
	// header, the message's own, the body; newline line ends.
	onDiskBody := showBody()
	if !strings.HasPrefix(onDiskBody, "Received: from ") || !strings.Contains(onDiskBody, "Subject: stuck\n\nthe body line\n") ||
		strings.Contains(onDiskBody, "\r") {
		t.Fatalf("show -body on disk:\n%q", onDiskBody)
	}
	if onDiskBody != fromDaemon {
		t.Errorf("show -body differs with and without the daemon:\n%q\n%q", fromDaemon, onDiskBody)
	}
	if code, out, _ := queueCmd(t, config, "show", "-headers", id); code != 0 || !strings.Contains(out, "Subject: stuck") ||
		strings.Contains(out, "the body line") {
		t.Fatalf("show -headers: exit %d\n%s", code, out)
	}
	code, out, _ = queueCmd(t, config, "summary")
	if code != 0 || !regexp.MustCompile(`(?m)^\s*example\.net\s+1\s+0\s+1\s+0\s+1\s`).MatchString(out) ||
		!regexp.MustCompile(`example\.net: 1 deferred, 451 4\.4\.3 `).MatchString(out) {
		t.Fatalf("summary on disk: exit %d\n%s", code, out)
	}
	// Changing the queue needs the daemon, and says so in one line.
	code, _, errOut = queueCmd(t, config, "hold", id)
	if code == 0 || !strings.Contains(errOut, "changing the queue needs the daemon") {
		t.Fatalf("hold without a daemon: exit %d, %q", code, errOut)
	}
	assertOneLine(t, errOut)
	if code, _, errOut := queueCmd(t, config, "show", "nosuchid"); code == 0 || !strings.Contains(errOut, "no such message") {
		t.Fatalf("show nosuchid on disk: exit %d, %q", code, errOut)
	}
}

func TestQueueBulkSelectionsCountWhatTheyTouch(t *testing.T) {
	dir := t.TempDir()
	config := writeConfig(t, dir, configParts{tail: "[delivery]\nretry_schedule = [\"1h\"]\n"})
	d := startDaemon(t, config)
	addr := d.submissionAddr()
	deferredID(t, d, addr, "app@example.com", "a@example.net", "Subject: 1\r\n\r\n1\r\n")
	deferredID(t, d, addr, "other@example.com", "b@example.net", "Subject: 2\r\n\r\n2\r\n")
	deferredID(t, d, addr, "app@example.com", "c@example.org", "Subject: 3\r\n\r\n3\r\n")

	want := func(wantCode int, wantOut string, args ...string) string {
		t.Helper()
		code, out, errOut := queueCmd(t, config, args[0], args[1:]...)
		if code != wantCode || !strings.Contains(out+errOut, wantOut) {
			t.Fatalf("queue %s: exit %d, want %d with %q:\n%s%s", strings.Join(args, " "), code, wantCode, wantOut, out, errOut)
		}
		return out + errOut
	}
	want(0, "held 2 recipient(s) of 2 message(s)", "hold", "-domain", "example.net")
	d.waitFor(fmt.Sprintf(`queue hold by the administrator.*domain=example.net.*by_uid=%d`, os.Getuid()))
	want(0, "released 1 recipient(s) of 1 message(s)", "release", "-sender", "app@example.com", "-status", "held")
	want(0, "held 0 recipient(s) of 0 message(s)", "hold", "-domain", "example.net", "-sender", "nobody@example.com")

	// More than one message to bounce: nothing happens without -yes.
	out := want(1, "3 messages match; run again with -yes to bounce them all", "bounce", "-all")
	assertOneLine(t, out)
	// One message needs no -yes.
	want(0, "deleted 1 recipient(s) of 1 message(s)", "delete", "-domain", "example.org")
	out = want(0, "", "delete", "-all", "-yes", "-json")
	var res struct{ Messages, Recipients int }
	if err := json.Unmarshal([]byte(out), &res); err != nil || res.Messages != 2 || res.Recipients != 2 {
		t.Fatalf("delete -all -yes -json: %v %s", err, out)
	}
	want(0, "The queue is empty.", "list")

	// Usage errors: one line that says what is wrong, then the usage.
	for _, args := range [][]string{{"hold"}, {"hold", "someid", "-all"}, {"show"}, {"list", "someid"}} {
		code, _, errOut := queueCmd(t, config, args[0], args[1:]...)
		first, _, _ := strings.Cut(errOut, "\n")
		if code != 2 || !strings.HasPrefix(first, "stsrelay queue "+args[0]+": ") || !strings.Contains(errOut, "usage: stsrelay queue "+args[0]) {
			t.Errorf("queue %v: exit %d\n%s", args, code, errOut)
		}
	}
	want(1, `status "frozen" is not one of active, deferred, held`, "hold", "-status", "frozen")
	d.stop(syscall.SIGTERM)
}

func TestAFailedManualRetryKeepsTheRetrySchedule(t *testing.T) {
	dir := t.TempDir()
	config := writeConfig(t, dir, configParts{tail: "[delivery]\nretry_schedule = [\"1h\", \"2h\"]\n"})
	d := startDaemon(t, config)
	addr := d.submissionAddr()
	id := deferredID(t, d, addr, "app@example.com", "late@example.net", "Subject: r\r\n\r\nr\r\n")
	next := func() string {
		t.Helper()
		code, out, errOut := queueCmd(t, config, "show", "-json", id)
		var m struct {
			Recipients []struct {
				Attempts    int    `json:"attempts"`
				NextAttempt string `json:"next_attempt"`
			} `json:"recipients"`
		}
		if code != 0 || json.Unmarshal([]byte(out), &m) != nil || len(m.Recipients) != 1 {
			t.Fatalf("show -json: exit %d %s %s", code, out, errOut)
		}
		return fmt.Sprintf("%d attempts, next %s", m.Recipients[0].Attempts, m.Recipients[0].NextAttempt)
	}
	planned := next()
	if code, out, errOut := queueCmd(t, config, "retry", id); code != 0 || !strings.Contains(out, id+": retrying now 1 recipient(s)") {
		t.Fatalf("retry: exit %d %s %s", code, out, errOut)
	}
	d.waitFor(`recipients updated.*recipients=late@example.net.*outcome=deferred.*attempt=2`)
	got := next()
	if want := strings.Replace(planned, "1 attempts", "2 attempts", 1); got != want {
		t.Fatalf("after a failed manual retry: %s; want the planned attempt kept: %s", got, want)
	}
	d.stop(syscall.SIGTERM)
}

// stallingSession is a sink's session that stops reading in DATA until
// the test lets it go on, as a slow or hostile server does; it then
// reads the rest and says whether the message arrived whole.
type stallingSession struct {
	inData chan struct{}
	goOn   chan struct{}
	read   chan error // what reading the rest of the message ended with
}

func (s *stallingSession) Reset()                               {}
func (s *stallingSession) Logout() error                        { return nil }
func (s *stallingSession) Mail(string, *smtp.MailOptions) error { return nil }
func (s *stallingSession) Rcpt(string, *smtp.RcptOptions) error { return nil }
func (s *stallingSession) Data(r io.Reader) error {
	close(s.inData)
	<-s.goOn
	_, err := io.Copy(io.Discard, r)
	s.read <- err
	return err
}

// An operator's bounce stops a transfer under way: the relay closes the
// connection, and the remote never gets the final dot of a message whose
// sender was told it failed.
func TestBounceClosesTheTransferInFlight(t *testing.T) {
	ss := &stallingSession{inData: make(chan struct{}), goOn: make(chan struct{}), read: make(chan error, 1)}
	k := startSinkAt(t, "127.0.0.1:0", nil, func(s *smtp.Server) {
		s.Backend = smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) { return ss, nil })
	})
	config := writeConfig(t, t.TempDir(), configParts{tail: "[delivery]\nretry_schedule = [\"1h\"]\n\n" + sinkRoute(k)})
	d := startDaemon(t, config)
	// Far more than the socket buffers on both sides hold (a receive
	// buffer grows only as its reader reads): the relay is still sending
	// when it is cut off.
	line := strings.Repeat("x", 76) + "\r\n"
	submit(t, d.submissionAddr(), "app@example.com", "user@example.net", "Subject: a long one\r\n\r\n"+strings.Repeat(line, (16<<20)/len(line)))
	select {
	case <-ss.inData:
	case <-time.After(30 * time.Second):
		t.Fatalf("the transfer did not reach DATA; log:\n%s", d.output())
	}

	code, out, errOut := queueCmd(t, config, "list", "-json")
	var msgs []struct {
		ID string `json:"id"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &msgs) != nil || len(msgs) != 1 {
		t.Fatalf("queue list -json: exit %d, %s%s", code, out, errOut)
	}
	if code, _, errOut := queueCmd(t, config, "bounce", msgs[0].ID); code != 0 {
		t.Fatalf("queue bounce: %s", errOut)
	}
	close(ss.goOn)
	select {
	case err := <-ss.read:
		if err == nil {
			t.Fatal("the remote got the whole message after the operator bounced it")
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the connection stayed open after the bounce")
	}
	d.waitFor(`delivery attempt.*outcome=deferred.*delivery interrupted.*bounced by the mail system administrator`)
	d.waitFor(`queued DSN.*orig_id=` + msgs[0].ID)
	d.stop(syscall.SIGTERM)
}

func TestLogLinesCarryQueueIDAndMessageIDInTextAndJSON(t *testing.T) {
	for _, format := range []string{"text", "json"} {
		t.Run(format, func(t *testing.T) {
			dir := t.TempDir()
			config := writeConfig(t, dir, configParts{logFormat: format, tail: "[delivery]\nretry_schedule = [\"1h\"]\n"})
			d := startDaemon(t, config)
			var addr string
			if format == "json" {
				line := d.waitFor(`stsrelay started`)
				var start map[string]any
				if err := json.Unmarshal([]byte(line), &start); err != nil {
					t.Fatalf("start line is not JSON: %v\n%s", err, line)
				}
				addr, _ = start["submission"].(string)
			} else {
				addr = d.submissionAddr()
			}
			submit(t, addr, "app@example.com", "user@example.net", "Message-ID: <log.1@app.example>\r\nSubject: l\r\n\r\nl\r\n")
			attempt := d.waitFor(`delivery attempt`)
			d.stop(syscall.SIGTERM)

			var accepted []string
			for _, l := range strings.Split(d.output(), "\n") {
				if strings.Contains(l, "accepted") || strings.Contains(l, `"queued"`) || strings.Contains(l, "msg=queued") {
					accepted = append(accepted, l)
				}
			}
			if len(accepted) != 1 {
				t.Fatalf("%d lines for one submission, want 1:\n%s", len(accepted), strings.Join(accepted, "\n"))
			}
			fields := map[string]string{}
			if format == "json" {
				for _, l := range []string{accepted[0], attempt} {
					var m map[string]any
					if err := json.Unmarshal([]byte(l), &m); err != nil {
						t.Fatalf("not JSON: %v\n%s", err, l)
					}
					for k, v := range m {
						// Durations are Go duration strings, never nanoseconds.
						if k == "duration" || k == "took" {
							if _, ok := v.(string); !ok {
								t.Errorf("%s = %v (%T), want a duration string", k, v, v)
							} else if _, err := time.ParseDuration(v.(string)); err != nil {
								t.Errorf("%s = %q: %v", k, v, err)
							}
						}
						fields[m["msg"].(string)+"."+k] = fmt.Sprint(v)
					}
				}
			} else {
				kv := regexp.MustCompile(`(\w+)=("(?:[^"\\]|\\.)*"|\S*)`)
				for _, l := range []string{accepted[0], attempt} {
					msg := kv.FindStringSubmatch(l[strings.Index(l, "msg="):])[2]
					for _, m := range kv.FindAllStringSubmatch(l, -1) {
						fields[strings.Trim(msg, `"`)+"."+m[1]] = strings.Trim(m[2], `"`)
					}
				}
			}
			id := fields["smtpin: accepted.id"]
			if id == "" || fields["delivery attempt.id"] != id {
				t.Errorf("queue id: accepted %q, attempt %q", id, fields["delivery attempt.id"])
			}
			for _, msg := range []string{"smtpin: accepted", "delivery attempt"} {
				if got := fields[msg+".message_id"]; got != "<log.1@app.example>" {
					t.Errorf("%s: message_id %q", msg, got)
				}
			}
			if fields["smtpin: accepted.size"] == "" {
				t.Error("accepted line has no size")
			}
		})
	}
}

func TestStartWarnsAboutWhatIsNotEnforced(t *testing.T) {
	dir := t.TempDir()
	config := writeConfig(t, dir, configParts{hostname: "-"})
	d := startDaemon(t, config)
	d.submissionAddr()
	d.waitFor(`hostname is not set; using the machine's name`)
	d.stop(syscall.SIGTERM)
	out := d.output()
	if strings.Contains(out, "DANE") {
		t.Errorf("a DANE warning with DANE on and a loopback resolver:\n%s", out)
	}

	// A fully qualified name with an address, DANE off: only that is said.
	dns := dnstest.New(t, "relay.example.com. 60 IN A 192.0.2.25")
	dir = t.TempDir()
	d = startDaemon(t, writeConfig(t, dir, configParts{hostname: "relay.example.com", resolver: dns.Addr, tail: "[dane]\nenabled = false\n"}))
	if line := d.waitFor(`stsrelay started`); !strings.Contains(line, "hostname=relay.example.com") {
		t.Errorf("start line does not name the hostname: %s", line)
	}
	d.waitFor(`hostname has an address`)
	d.stop(syscall.SIGTERM)
	if out := d.output(); strings.Contains(out, "level=WARN msg=hostname") || strings.Count(out, "DANE") != 1 ||
		!strings.Contains(out, "DANE is disabled (dane.enabled = false): no domain's TLSA records are enforced") {
		t.Errorf("warnings for a good hostname and DANE off:\n%s", out)
	}

	// A name without an address is worth a warning.
	dir = t.TempDir()
	d = startDaemon(t, writeConfig(t, dir, configParts{hostname: "noaddr.example.com", resolver: dns.Addr}))
	d.waitFor(`hostname has no A or AAAA record.*hostname=noaddr.example.com`)
	d.stop(syscall.SIGTERM)
}

// A relay running without MTA-STS says so, naming the key, to every sts
// command, rather than a bare 404.
func TestSTSCommandsSayWhenMTASTSIsOff(t *testing.T) {
	config := writeConfig(t, t.TempDir(), configParts{tail: "[sts]\nenabled = false\n"})
	d := startDaemon(t, config)
	d.submissionAddr()
	defer d.stop(syscall.SIGTERM)
	for _, cmd := range []string{"list", "show", "refresh", "purge"} {
		args := []string{"sts", cmd, "-config", config}
		if cmd != "list" {
			args = append(args, "example.org")
		}
		code, _, errOut := stsrelay(t, "", args...)
		if code == 0 || !strings.Contains(errOut, "sts.enabled = false") {
			t.Errorf("sts %s with MTA-STS off: exit %d, %q", cmd, code, errOut)
		}
		assertOneLine(t, errOut)
	}
}

func TestHelpClaimsWhatIsBuilt(t *testing.T) {
	_, out, _ := stsrelay(t, "", "help")
	if !strings.Contains(out, "enforces MTA-STS and DANE and sends TLS reports") {
		t.Errorf("help does not say what is enforced:\n%s", out)
	}
	if !strings.Contains(out, "tlsrpt         show and send TLS reports (RFC 8460)") {
		t.Errorf("help does not list the tlsrpt command:\n%s", out)
	}
	unit, err := os.ReadFile("../../systemd/stsrelay.service")
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(unit), "\n") {
		if strings.HasPrefix(l, "Description=") && !strings.Contains(l, "MTA-STS and DANE enforcing, TLS reporting") {
			t.Errorf("unit does not say what is built: %s", l)
		}
		// What the unit points systemctl help at, the README's install
		// steps put there.
		if doc, ok := strings.CutPrefix(l, "Documentation=file://"); ok && !strings.Contains(string(readme), "README.md "+doc) {
			t.Errorf("the README's install steps do not install %s, which the unit names", doc)
		}
	}
}

func TestConfigErrorsNameLineKeyAndType(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	for _, c := range []struct {
		name, tail, want string
	}{
		{"unknown table", "[foo]\n", `: foo: unknown table`},
		{"string for a number", "[delivery]\nworkers = \"32\"\n", `delivery.workers: is a string, want a whole number (no quotes)`},
		{"syntax error", "[delivery]\nworkers = 3\nretry_schedule = [\"1h\" \"2h\"]\nconnect_timeout = \"5s\"\n", `expected a comma`},
		{"metrics port in use", "[metrics]\nlisten = \"" + busy.Addr().String() + "\"\n", `metrics.listen: listen tcp ` + busy.Addr().String() + `: bind: address already in use`},
	} {
		t.Run(c.name, func(t *testing.T) {
			config := writeConfig(t, t.TempDir(), configParts{tail: c.tail})
			text, _ := os.ReadFile(config)
			code, _, stderr := stsrelay(t, "", "serve", "-config", config)
			if code == 0 {
				t.Fatal("serve started")
			}
			// One line, and no warning before it.
			assertOneLine(t, stderr)
			if !strings.Contains(stderr, c.want) {
				t.Fatalf("stderr %q does not say %q", stderr, c.want)
			}
			if c.name != "metrics port in use" {
				// The line named is where the mistake is.
				lines := strings.Split(string(text), "\n")
				m := regexp.MustCompile(`line (\d+)`).FindStringSubmatch(stderr)
				var n int
				if m != nil {
					fmt.Sscan(m[1], &n)
				}
				if n < 1 || n > len(lines) {
					t.Fatalf("stderr %q names no line of the file", stderr)
				}
				key := strings.Fields(strings.NewReplacer("[", " ", "]", " ", "=", " ").Replace(lines[n-1]))
				if len(key) == 0 || !strings.Contains(c.tail, lines[n-1]) {
					t.Fatalf("line %d is %q, not the mistake in\n%s", n, lines[n-1], c.tail)
				}
			}
		})
	}
}

func TestQueueCommandsHintWhoMayRunThem(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("switches to the nobody user, which needs root")
	}
	dir := t.TempDir()
	config := writeConfig(t, dir, configParts{})
	d := startDaemon(t, config)
	d.submissionAddr()
	// The configuration and the binary are readable by anyone; the state
	// directory (0700) is not.
	for _, p := range []string{dir, filepath.Dir(binary)} {
		os.Chmod(p, 0o755)
	}
	os.Chmod(config, 0o644)
	cmd := exec.Command(binary, "queue", "list", "-config", config)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, _ := cmd.CombinedOutput()
	if cmd.ProcessState.ExitCode() == 0 || !strings.Contains(string(out), "permission denied (run as root or the stsrelay user)") {
		t.Fatalf("queue list as nobody: exit %d: %s", cmd.ProcessState.ExitCode(), out)
	}
	assertOneLine(t, string(out))
	d.stop(syscall.SIGTERM)
}

// openPTY returns a pseudo-terminal's controller and its terminal end.
func openPTY(t *testing.T) (ptmx, tty *os.File) {
	t.Helper()
	ptmx, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	fd := int(ptmx.Fd())
	if err := unix.IoctlSetPointerInt(fd, unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(fd, unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	tty, err = os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ptmx.Close(); tty.Close() })
	return ptmx, tty
}

func TestHashPasswordOnATerminalPromptsWithoutEcho(t *testing.T) {
	ptmx, tty := openPTY(t)
	cmd := exec.Command(binary, "hash-password")
	var stdout strings.Builder
	cmd.Stdin, cmd.Stderr, cmd.Stdout = tty, tty, &stdout
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	tty.Close()
	screen := make(chan string, 100)
	go func() {
		buf := make([]byte, 1024)
		for {
			n, err := ptmx.Read(buf)
			if n > 0 {
				screen <- string(buf[:n])
			}
			if err != nil {
				close(screen)
				return
			}
		}
	}()
	var seen strings.Builder
	waitFor := func(s string) {
		t.Helper()
		deadline := time.After(30 * time.Second)
		for !strings.Contains(seen.String(), s) {
			select {
			case chunk, ok := <-screen:
				if !ok {
					t.Fatalf("terminal closed before %q; it showed %q", s, seen.String())
				}
				seen.WriteString(chunk)
			case <-deadline:
				t.Fatalf("no %q on the terminal; it showed %q", s, seen.String())
			}
		}
	}
	waitFor("Password: ")
	ptmx.WriteString("s3cret horse\n")
	waitFor("Again: ")
	ptmx.WriteString("s3cret horse\n")
	if err := cmd.Wait(); err != nil {
		t.Fatalf("hash-password: %v; terminal showed %q", err, seen.String())
	}
	for chunk := range screen {
		seen.WriteString(chunk)
	}
	if strings.Contains(seen.String(), "s3cret") {
		t.Fatalf("the password was echoed: %q", seen.String())
	}
	hash := strings.TrimSpace(stdout.String())
	if err := bcrypt.CompareHashAndPassword([]byte(hash), []byte("s3cret horse")); err != nil {
		t.Fatalf("%q does not verify: %v", hash, err)
	}
	// The cost the README and the example show.
	if !strings.HasPrefix(hash, "$2a$10$") {
		t.Errorf("hash %q: want bcrypt cost 10, as documented", hash)
	}
	for _, doc := range []string{"../../README.md", "../../config.toml.example"} {
		text, _ := os.ReadFile(doc)
		if m := regexp.MustCompile(`\$2[aby]\$(\d\d)\$`).FindAllStringSubmatch(string(text), -1); len(m) == 0 {
			t.Errorf("%s shows no password hash", doc)
		} else {
			for _, x := range m {
				if x[1] != "10" {
					t.Errorf("%s shows bcrypt cost %s; hash-password uses 10", doc, x[1])
				}
			}
		}
	}
}

// What clients sent (addresses, a Message-ID, header fields) reaches the
// operator's terminal escaped in queue list and show, text and JSON: an
// SMTPUTF8 address may hold C1 controls and bidi overrides, a header ESC
// and BEL.
func TestQueueListAndShowEscapeWhatClientsSent(t *testing.T) {
	dir := t.TempDir()
	config := writeConfig(t, dir, configParts{})
	db, err := queue.OpenDB(filepath.Join(dir, "state", "stsrelay.db"))
	if err != nil {
		t.Fatal(err)
	}
	q, err := queue.New(db, queue.Options{Deliverer: parked{}, Hostname: "relay.test", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	env := queue.Envelope{From: "evil\u202e@example.com", SMTPUTF8: true,
		Recipients: []queue.RecipientParams{{Addr: "a\u009b2Jb@example.net"}}}
	id, err := q.Enqueue(context.Background(), env, strings.NewReader("Message-ID: <x\x1b[2J@y>\r\nSubject: \x1b]0;pwned\x07 \r\n\tfolded\r\n\r\nbody\r\n"))
	if err != nil {
		t.Fatal(err)
	}
	q.Close()
	db.Close()

	raw := regexp.MustCompile("[\x1b\x07\u009b\u202e]")
	for _, args := range [][]string{{"list"}, {"list", "-json"}, {"show", id}, {"show", "-json", id}} {
		code, out, errOut := queueCmd(t, config, args[0], args[1:]...)
		if code != 0 {
			t.Fatalf("queue %v: exit %d: %s", args, code, errOut)
		}
		if m := raw.FindString(out); m != "" {
			t.Errorf("queue %v printed %q raw:\n%s", args, m, out)
		}
		if !strings.Contains(out, "evil") || !strings.Contains(out, "example.net") {
			t.Errorf("queue %v lost the addresses:\n%s", args, out)
		}
	}
}
