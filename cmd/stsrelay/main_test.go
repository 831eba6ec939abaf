package main

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"

	"github.com/stsrelay/stsrelay/internal/testpki"
)

// binary is the stsrelay command built once for these tests: they run it
// as a user would, as a separate process.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "stsrelay-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "stsrelay")
	args := []string{"build", "-o", binary, "."}
	if raceEnabled {
		args = []string{"build", "-race", "-o", binary, "."}
	}
	out, err := exec.Command("go", args...).CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building stsrelay: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// daemon is a running `stsrelay serve`.
type daemon struct {
	t      *testing.T
	cmd    *exec.Cmd
	config string
	mu     sync.Mutex
	log    bytes.Buffer
	lines  chan string
	exited chan error
}

// configParts vary the test configuration.
type configParts struct {
	resolver   string // dns.resolver; default: nothing listens there
	hostname   string // default relay.test; "-" leaves the key out
	logFormat  string // log.format; default text
	submission string // more [submission] keys
	tail       string // more tables
}

// writeConfig writes a configuration for a daemon in dir.
func writeConfig(t *testing.T, dir string, c configParts) string {
	t.Helper()
	if c.resolver == "" {
		c.resolver = "127.0.0.1:1"
	}
	hostname := `hostname = "relay.test"`
	switch c.hostname {
	case "":
	case "-":
		hostname = ""
	default:
		hostname = "hostname = " + strconv.Quote(c.hostname)
	}
	if c.logFormat == "" {
		c.logFormat = "text"
	}
	// Nothing answers at the default resolver, which fails at once; a test
	// DNS server gets time to answer on a loaded machine.
	dnsTimeout := "100ms"
	if c.resolver != "127.0.0.1:1" {
		dnsTimeout = "2s"
	}
	p := filepath.Join(dir, "config.toml")
	text := hostname + `
state_dir = "state"
[log]
level = "debug"
format = "` + c.logFormat + `"
[submission]
listen = "127.0.0.1:0"
trusted_networks = ["127.0.0.0/8"]
` + c.submission + `
[dns]
resolver = "` + c.resolver + `"
timeout = "` + dnsTimeout + `"
` + c.tail
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func startDaemon(t *testing.T, config string, env ...string) *daemon {
	t.Helper()
	return startBinary(t, binary, config, env...)
}

// startBinary is startDaemon with another build of stsrelay.
func startBinary(t *testing.T, bin, config string, env ...string) *daemon {
	t.Helper()
	d := &daemon{t: t, config: config, lines: make(chan string, 1000), exited: make(chan error, 1)}
	d.cmd = exec.Command(bin, "serve", "-config", config)
	d.cmd.Env = append(os.Environ(), env...)
	stderr, err := d.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			d.mu.Lock()
			d.log.WriteString(sc.Text() + "\n")
			d.mu.Unlock()
			select {
			case d.lines <- sc.Text():
			default:
			}
		}
		d.exited <- d.cmd.Wait()
	}()
	t.Cleanup(func() {
		if d.cmd.ProcessState == nil {
			d.cmd.Process.Kill()
			<-d.exited
		}
	})
	return d
}

// waitFor returns the first log line matching re, failing after a while.
func (d *daemon) waitFor(re string) string {
	d.t.Helper()
	pattern := regexp.MustCompile(re)
	deadline := time.After(30 * time.Second)
	for {
		select {
		case line := <-d.lines:
			if pattern.MatchString(line) {
				return line
			}
		case err := <-d.exited:
			d.exited <- err
			d.t.Fatalf("daemon exited (%v) before logging %q:\n%s", err, re, d.output())
		case <-deadline:
			d.t.Fatalf("no log line %q within 30s:\n%s", re, d.output())
		}
	}
}

func (d *daemon) output() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.log.String()
}

// submissionAddr waits for readiness and returns the bound address.
func (d *daemon) submissionAddr() string {
	d.t.Helper()
	line := d.waitFor(`stsrelay started`)
	m := regexp.MustCompile(`submission=(\S+)`).FindStringSubmatch(line)
	if m == nil {
		d.t.Fatalf("start line without the submission address: %s", line)
	}
	return m[1]
}

// stop sends sig and returns the exit code.
func (d *daemon) stop(sig syscall.Signal) int {
	d.t.Helper()
	d.cmd.Process.Signal(sig)
	select {
	case <-d.exited:
	case <-time.After(60 * time.Second):
		d.t.Fatalf("daemon did not stop within 60s after %v:\n%s", sig, d.output())
	}
	return d.cmd.ProcessState.ExitCode()
}

// stsrelay runs a CLI command and returns its exit code, stdout and stderr.
func stsrelay(t *testing.T, stdin string, args ...string) (int, string, string) {
	t.Helper()
	return stsrelayEnv(t, nil, stdin, args...)
}

// stsrelayEnv is stsrelay with extra environment variables.
func stsrelayEnv(t *testing.T, env []string, stdin string, args ...string) (int, string, string) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = strings.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil && cmd.ProcessState == nil {
		t.Fatal(err)
	}
	return cmd.ProcessState.ExitCode(), stdout.String(), stderr.String()
}

func submit(t *testing.T, addr, from, to, body string) {
	t.Helper()
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SendMail(from, []string{to}, strings.NewReader(body)); err != nil {
		t.Fatalf("submitting: %v", err)
	}
}

// assertOneLine fails unless text is one line without a Go panic or trace.
func assertOneLine(t *testing.T, text string) {
	t.Helper()
	text = strings.TrimSuffix(text, "\n")
	if strings.Contains(text, "\n") || strings.Contains(text, "panic") || strings.Contains(text, "goroutine ") {
		t.Fatalf("want one clear line, got:\n%s", text)
	}
}

func TestServeAcceptsMailAndStopsCleanlyOnSIGTERM(t *testing.T) {
	dir := t.TempDir()
	config := writeConfig(t, dir, configParts{})
	d := startDaemon(t, config)
	addr := d.submissionAddr()

	submit(t, addr, "app@example.com", "user@example.net", "Subject: hi\r\n\r\nhello\r\n")
	d.waitFor(`id=\S+`)

	code, out, errOut := stsrelay(t, "", "queue", "list", "-json", "-config", config)
	if code != 0 {
		t.Fatalf("queue list: exit %d: %s", code, errOut)
	}
	var list []map[string]any
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("queue list -json is not JSON: %v\n%s", err, out)
	}
	if len(list) != 1 || list[0]["from"] != "app@example.com" {
		t.Fatalf("queue list = %s, want the one submitted message", out)
	}
	if fi, err := os.Stat(filepath.Join(dir, "state", "control.sock")); err != nil || fi.Mode().Perm()&0o077 != 0 {
		t.Fatalf("control socket: %v, mode %v; want owner-only", err, fi.Mode())
	}

	if code := d.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("exit code %d after SIGTERM:\n%s", code, d.output())
	}
	if !strings.Contains(d.output(), "stopped") {
		t.Fatalf("no 'stopped' line:\n%s", d.output())
	}

	// What was acknowledged is still there after the restart.
	d2 := startDaemon(t, config)
	d2.submissionAddr()
	code, out, _ = stsrelay(t, "", "queue", "list", "-json", "-config", config)
	if code != 0 || !strings.Contains(out, "user@example.net") {
		t.Fatalf("after restart, queue list = %d %s", code, out)
	}
	if code := d2.stop(syscall.SIGINT); code != 0 {
		t.Fatalf("exit code %d after SIGINT", code)
	}
}

func TestServeRunsTheExampleConfig(t *testing.T) {
	dir := t.TempDir()
	example, err := os.ReadFile("../../config.toml.example")
	if err != nil {
		t.Fatal(err)
	}
	// Same file, but on a free port so a relay already on 2525 does not
	// fail the test; everything else is as shipped.
	text := strings.Replace(string(example), `listen = "127.0.0.1:2525"`, `listen = "127.0.0.1:0"`, 1)
	if text == string(example) {
		t.Fatal("config.toml.example no longer listens on 127.0.0.1:2525")
	}
	config := filepath.Join(dir, "config.toml")
	os.WriteFile(config, []byte(text), 0o600)
	d := startDaemon(t, config)
	d.submissionAddr()
	if _, err := os.Stat(filepath.Join(dir, "var", "stsrelay.db")); err != nil {
		t.Fatalf("state not under ./var: %v", err)
	}
	if code := d.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("exit code %d", code)
	}
}

func TestServeTellsSystemdWhenReady(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	d := startDaemon(t, writeConfig(t, dir, configParts{}), "NOTIFY_SOCKET="+sock)
	conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 256)
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatalf("no sd_notify message: %v\n%s", err, d.output())
	}
	if string(buf[:n]) != "READY=1" {
		t.Fatalf("sd_notify sent %q, want READY=1", buf[:n])
	}
	// Readiness means listening: a connection must succeed right now.
	c, err := net.Dial("tcp", d.submissionAddr())
	if err != nil {
		t.Fatalf("ready but not listening: %v", err)
	}
	c.Close()

	// A reload is bracketed by RELOADING=1, with the monotonic time that
	// systemd 253+ matches the next READY=1 by, and READY=1.
	d.cmd.Process.Signal(syscall.SIGHUP)
	for _, want := range []string{`^RELOADING=1\nMONOTONIC_USEC=\d+$`, `^READY=1$`} {
		n, err := conn.Read(buf)
		if err != nil {
			t.Fatalf("no sd_notify message after SIGHUP: %v\n%s", err, d.output())
		}
		if !regexp.MustCompile(want).Match(buf[:n]) {
			t.Fatalf("sd_notify sent %q after SIGHUP, want %s", buf[:n], want)
		}
	}
	d.stop(syscall.SIGTERM)
	if n, err := conn.Read(buf); err != nil || string(buf[:n]) != "STOPPING=1" {
		t.Fatalf("sd_notify at SIGTERM: %q, %v; want STOPPING=1", buf[:n], err)
	}
}

func TestServeReloadsUsersOnSIGHUP(t *testing.T) {
	dir := t.TempDir()
	config := writeConfig(t, dir, configParts{})
	d := startDaemon(t, config)
	d.submissionAddr()

	hash, err := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	writeConfig(t, dir, configParts{
		submission: fmt.Sprintf("[[submission.users]]\nname = \"app\"\npassword_hash = %q\n[submission.auth_limit]\nfailures = 7\n", hash),
		tail:       "[delivery]\nworkers = 3\n",
	})
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.waitFor(`reload: users loaded.*users=1`)
	// The key itself, not only its section.
	d.waitFor(`needs a restart.*key=submission.auth_limit.failures`)
	d.waitFor(`needs a restart.*key=delivery.workers`)

	// A broken file keeps the running configuration.
	os.WriteFile(config, []byte("hostname = \n"), 0o600)
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.waitFor(`reload failed; keeping the running configuration`)
	if code := d.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("exit code %d", code)
	}
}

func TestServeReloadsTheCertificateOnSIGHUP(t *testing.T) {
	dir := t.TempDir()
	ca := testpki.NewCA(t)
	certFile, keyFile := testpki.WriteFiles(t, dir, ca.Issue(t, "relay.test"))
	d := startDaemon(t, writeConfig(t, dir, configParts{
		submission: fmt.Sprintf("tls_cert = %q\ntls_key = %q\n", certFile, keyFile),
	}))
	addr := d.submissionAddr()
	serial := func() string {
		t.Helper()
		c, err := smtp.DialStartTLS(addr, &tls.Config{ServerName: "relay.test", RootCAs: ca.Pool})
		if err != nil {
			t.Fatalf("STARTTLS: %v", err)
		}
		defer c.Close()
		if err := c.Noop(); err != nil { // completes the handshake
			t.Fatal(err)
		}
		cs, ok := c.TLSConnectionState()
		if !ok || len(cs.PeerCertificates) == 0 {
			t.Fatal("no TLS after STARTTLS")
		}
		return cs.PeerCertificates[0].SerialNumber.String()
	}
	before := serial()
	testpki.WriteFiles(t, dir, ca.Issue(t, "relay.test")) // same paths, new certificate
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.waitFor(`reload: certificate loaded`)
	if after := serial(); after == before {
		t.Fatal("STARTTLS still presents the old certificate after SIGHUP")
	}
	d.stop(syscall.SIGTERM)
}

func TestServeFailsInOneLine(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()

	for _, c := range []struct {
		name  string
		setup func(dir string) string // returns the config path
		want  string
	}{
		{"missing config", func(dir string) string { return filepath.Join(dir, "nope.toml") }, "nope.toml: no such file"},
		{"bad value", func(dir string) string {
			return writeConfig(t, dir, configParts{submission: "max_message_size = \"35XB\""})
		}, `line 9: submission.max_message_size: "35XB" is not a size`},
		{"port in use", func(dir string) string {
			p := writeConfig(t, dir, configParts{})
			text, _ := os.ReadFile(p)
			os.WriteFile(p, bytes.Replace(text, []byte("127.0.0.1:0"), []byte(busy.Addr().String()), 1), 0o600)
			return p
		}, "address already in use"},
		{"metrics port in use, with a start warning due", func(dir string) string {
			// TLS reporting without a [[dkim]] key is worth a warning, but
			// only once the start has succeeded.
			return writeConfig(t, dir, configParts{tail: "[metrics]\nlisten = \"" + busy.Addr().String() + "\"\n" +
				"[tlsrpt]\nenabled = true\norganization_name = \"Example\"\ncontact_info = \"tlsrpt@example.com\"\n"})
		}, "metrics.listen"},
		{"state_dir is a file", func(dir string) string {
			p := writeConfig(t, dir, configParts{})
			os.WriteFile(filepath.Join(dir, "state"), []byte("x"), 0o600)
			return p
		}, "state_dir " + "PLACEHOLDER"},
		{"state_dir too long for the control socket", func(dir string) string {
			p := writeConfig(t, dir, configParts{})
			text, _ := os.ReadFile(p)
			os.WriteFile(p, bytes.Replace(text, []byte(`state_dir = "state"`), []byte(`state_dir = "`+strings.Repeat("s", 110)+`"`), 1), 0o600)
			return p
		}, "state_dir: the control socket "},
		{"foreign database", func(dir string) string {
			p := writeConfig(t, dir, configParts{})
			os.MkdirAll(filepath.Join(dir, "state"), 0o700)
			os.WriteFile(filepath.Join(dir, "state", "stsrelay.db"), bytes.Repeat([]byte("not a database "), 1000), 0o600)
			return p
		}, "stsrelay.db"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			config := c.setup(dir)
			want := strings.Replace(c.want, "PLACEHOLDER", filepath.Join(dir, "state"), 1)
			code, stdout, stderr := stsrelay(t, "", "serve", "-config", config)
			if code == 0 {
				t.Fatalf("exit 0, want failure; stdout %s", stdout)
			}
			assertOneLine(t, stderr)
			if !strings.HasPrefix(stderr, "stsrelay: ") || !strings.Contains(stderr, want) {
				t.Fatalf("stderr %q does not say %q", stderr, want)
			}
		})
	}
}

func TestHashPasswordPrintsAVerifiableHash(t *testing.T) {
	code, out, stderr := stsrelay(t, "correct horse\n", "hash-password")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	hash := strings.TrimSpace(out)
	if err := bcrypt.CompareHashAndPassword([]byte(hash), []byte("correct horse")); err != nil {
		t.Fatalf("%q does not verify: %v", hash, err)
	}
	if code, _, stderr := stsrelay(t, "", "hash-password", "secret"); code == 0 || !strings.Contains(stderr, "standard input") {
		t.Fatalf("a password argument was accepted: %d %q", code, stderr)
	}
	if code, _, _ := stsrelay(t, "", "hash-password"); code == 0 {
		t.Fatal("an empty password was hashed")
	}
}

func TestHelpReadsLikeTheGoTool(t *testing.T) {
	code, out, _ := stsrelay(t, "", "help")
	if code != 0 || !strings.Contains(out, "Usage:\n\n\tstsrelay <command> [arguments]") {
		t.Fatalf("help: %d\n%s", code, out)
	}
	for _, c := range commands() {
		if !strings.Contains(out, "\t"+c.name) {
			t.Errorf("help does not list %s", c.name)
		}
		code, _, stderr := stsrelay(t, "", c.name, "-help")
		if code != 0 || !strings.Contains(stderr, "usage: stsrelay "+c.name) {
			t.Errorf("%s -help: exit %d\n%s", c.name, code, stderr)
		}
	}
	if code, _, stderr := stsrelay(t, ""); code != 2 || !strings.Contains(stderr, "Usage:") {
		t.Errorf("no arguments: exit %d, %q", code, stderr)
	}
	if code, _, stderr := stsrelay(t, "", "frobnicate"); code != 2 || !strings.Contains(stderr, "unknown command") {
		t.Errorf("unknown command: exit %d, %q", code, stderr)
	}
	if code, out, _ := stsrelay(t, "", "version"); code != 0 || !strings.HasPrefix(out, "stsrelay ") {
		t.Errorf("version: %d %q", code, out)
	}
}

func TestServeExposesMetricsAndHealth(t *testing.T) {
	// A free port for [metrics] listen (it takes no port 0: the address is
	// what Prometheus scrapes, so it must be stable).
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	d := startDaemon(t, writeConfig(t, dir, configParts{tail: "[metrics]\nlisten = \"" + addr + "\"\n"}))
	subAddr := d.submissionAddr()

	get := func(path string) string {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			t.Fatalf("GET %s: %s", path, resp.Status)
		}
		return string(b)
	}
	if body := get("/healthz"); body != "ok\n" {
		t.Errorf("/healthz = %q", body)
	}
	for _, want := range []string{"stsrelay_queue_messages 0\n", "stsrelay_queue_oldest_message_age_seconds 0\n"} {
		if metrics := get("/metrics"); !strings.Contains(metrics, want) {
			t.Errorf("empty queue: /metrics lacks %q", want)
		}
	}
	submit(t, subAddr, "app@example.com", "user@example.net", "Subject: m\r\n\r\nm\r\n")
	// The gauges follow the commit that made the 250: no tick to wait for.
	metrics := get("/metrics")
	if !strings.Contains(metrics, "stsrelay_queue_messages 1\n") {
		t.Errorf("right after a submission, /metrics lacks stsrelay_queue_messages 1")
	}
	for _, want := range []string{"stsrelay_smtpin_messages_accepted_total 1", "stsrelay_queue_", "stsrelay_delivery_"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	// Profiles only when metrics.pprof asks for them.
	resp, err := http.Get("http://" + addr + "/debug/pprof/allocs")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Errorf("/debug/pprof/allocs without metrics.pprof: %s, want 404", resp.Status)
	}
	d.stop(syscall.SIGTERM)
}

func TestServeExposesProfilesWhenAsked(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	d := startDaemon(t, writeConfig(t, t.TempDir(), configParts{tail: "[metrics]\nlisten = \"" + addr + "\"\npprof = true\n"}))
	d.submissionAddr() // the metrics listener is bound once the daemon says it started
	for _, path := range []string{"/debug/pprof/allocs", "/debug/pprof/profile?seconds=1"} {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || len(b) == 0 {
			t.Errorf("GET %s: %s, %d bytes", path, resp.Status, len(b))
		}
	}
	d.stop(syscall.SIGTERM)
}

func TestQueueCommandsSteerTheRunningDaemon(t *testing.T) {
	dir := t.TempDir()
	// The resolver does not answer, so messages stay deferred.
	config := writeConfig(t, dir, configParts{tail: "[delivery]\nretry_schedule = [\"1h\"]\n"})
	d := startDaemon(t, config)
	addr := d.submissionAddr()
	deferred := func(rcpt string) string {
		t.Helper()
		submit(t, addr, "app@example.com", rcpt, "Subject: q\r\n\r\nq\r\n")
		line := d.waitFor(`recipients updated.*recipients=` + regexp.QuoteMeta(rcpt) + `.*outcome=deferred`)
		return regexp.MustCompile(`id=(\S+)`).FindStringSubmatch(line)[1]
	}
	q := func(args ...string) (int, string, string) {
		return stsrelay(t, "", append([]string{"queue", args[0], "-config", config}, args[1:]...)...)
	}
	state := func(id string) string {
		t.Helper()
		code, out, errOut := q("show", "-json", id)
		if code != 0 {
			t.Fatalf("queue show: %s", errOut)
		}
		var m struct {
			Recipients []struct{ State string }
		}
		if err := json.Unmarshal([]byte(out), &m); err != nil || len(m.Recipients) != 1 {
			t.Fatalf("queue show -json: %v\n%s", err, out)
		}
		return m.Recipients[0].State
	}

	id := deferred("one@example.net")
	if s := state(id); s != "deferred" {
		t.Fatalf("state %s, want deferred", s)
	}
	if code, out, _ := q("list"); code != 0 || !strings.Contains(out, id) || !strings.Contains(out, "one@example.net") {
		t.Fatalf("queue list:\n%s", out)
	}
	if code, _, errOut := q("hold", id); code != 0 {
		t.Fatalf("hold: %s", errOut)
	}
	if s := state(id); s != "held" {
		t.Fatalf("after hold: %s", s)
	}
	if code, _, errOut := q("release", id); code != 0 {
		t.Fatalf("release: %s", errOut)
	}
	if s := state(id); s == "held" {
		t.Fatal("still held after release")
	}
	if code, _, errOut := q("retry", "-all"); code != 0 {
		t.Fatalf("retry -all: %s", errOut)
	}
	if code, _, errOut := q("delete", id); code != 0 {
		t.Fatalf("delete: %s", errOut)
	}
	if code, _, _ := q("show", id); code == 0 {
		t.Fatal("a deleted message is still shown")
	}

	// Bouncing fails the recipient at once and tells the sender.
	id2 := deferred("two@example.net")
	if code, _, errOut := q("bounce", id2); code != 0 {
		t.Fatalf("bounce: %s", errOut)
	}
	d.waitFor(`queued DSN.*orig_id=` + id2 + `.*to=app@example.com`)

	for _, cmd := range []string{"show", "hold", "delete", "bounce"} {
		code, _, errOut := q(cmd, "nosuchid")
		if code == 0 || !strings.Contains(errOut, "no such message") {
			t.Errorf("queue %s nosuchid: exit %d, %q", cmd, code, errOut)
		}
		assertOneLine(t, errOut)
	}
	d.stop(syscall.SIGTERM)
}
