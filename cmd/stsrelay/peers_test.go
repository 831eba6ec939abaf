package main

// Real third-party peers against the binary: swaks submits (AUTH PLAIN and
// LOGIN, STARTTLS and implicit TLS), and a private Postfix instance uses
// stsrelay as its relayhost with the main.cf lines README.md gives.
//
// ROOT ONLY: the Postfix tests (Postfix sets up its queue as root).

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/internal/testpki"
)

// requireTool finds a third-party program; CI must have it (.ci/run
// installs it), elsewhere its absence skips the test.
func requireTool(t *testing.T, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s is not installed; CI must install the Debian package %s", name, pkg)
	}
	t.Skipf("%s is not installed (Debian package %s)", name, pkg)
	return ""
}

const (
	peerUser     = "postfix"
	peerPassword = "s3cret-relay-pw-4711"
)

// userBlock is a [[submission.users]] block for peerUser.
func userBlock(t *testing.T) string {
	t.Helper()
	hash, err := bcrypt.GenerateFromPassword([]byte(peerPassword), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("[[submission.users]]\nname = %q\npassword_hash = %q\nallowed_senders = [\"*@example.com\", \"*@postfix.test\"]\n", peerUser, hash)
}

func TestSwaksSubmitsWithPlainAndLoginOverSTARTTLSAndImplicitTLS(t *testing.T) {
	swaks := requireTool(t, "swaks", "swaks")
	dir := t.TempDir()
	ca := testpki.NewCA(t)
	caFile := ca.WriteCAFile(t, dir)
	certFile, keyFile := testpki.WriteFiles(t, dir, ca.Issue(t, "relay.test"))
	// No trusted network: every submission needs AUTH.
	config := filepath.Join(dir, "config.toml")
	os.WriteFile(config, []byte(fmt.Sprintf(`hostname = "relay.test"
state_dir = "state"
[log]
level = "debug"
[submission]
listen = "127.0.0.1:0"
listen_tls = "127.0.0.1:0"
tls_cert = %q
tls_key = %q
%s
[dns]
resolver = "127.0.0.1:1"
timeout = "100ms"
[delivery]
retry_schedule = ["1h"]
`, certFile, keyFile, userBlock(t))), 0o600)
	d := startDaemon(t, config)
	line := d.waitFor(`stsrelay started`)
	starttls := regexp.MustCompile(`submission=(\S+)`).FindStringSubmatch(line)[1]
	implicit := regexp.MustCompile(`submission_tls=(\S+)`).FindStringSubmatch(line)[1]

	for _, c := range []struct {
		name, mech, addr string
		tls              string // swaks option
	}{
		{"PLAIN over STARTTLS", "PLAIN", starttls, "--tls"},
		{"LOGIN over STARTTLS", "LOGIN", starttls, "--tls"},
		{"PLAIN over implicit TLS", "PLAIN", implicit, "--tls-on-connect"},
		{"LOGIN over implicit TLS", "LOGIN", implicit, "--tls-on-connect"},
	} {
		t.Run(c.name, func(t *testing.T) {
			rcpt := strings.ToLower(c.mech) + strings.ReplaceAll(c.tls, "-", "") + "@example.net"
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			host, port, _ := strings.Cut(c.addr, ":")
			out, err := exec.CommandContext(ctx, swaks,
				"--server", host, "--port", port, "--ehlo", "swaks.test",
				c.tls, "--tls-verify", "--tls-ca-path", caFile, "--tls-sni", "relay.test",
				"--auth", c.mech, "--auth-user", peerUser, "--auth-password", peerPassword,
				"--from", "app@example.com", "--to", rcpt,
				"--header", "Subject: swaks "+c.name, "--body", "Hello from swaks.").CombinedOutput()
			if err != nil {
				t.Fatalf("swaks: %v\n%s", err, out)
			}
			m := regexp.MustCompile(`queued as (\S+)`).FindSubmatch(out)
			if m == nil {
				t.Fatalf("swaks saw no queue id:\n%s", out)
			}
			code, show, errOut := stsrelay(t, "", "queue", "show", "-config", config, string(m[1]))
			if code != 0 || !strings.Contains(show, rcpt) {
				t.Fatalf("queue show %s: %s%s", m[1], show, errOut)
			}
			// The relay's line for the submission names the user.
			if !strings.Contains(d.output(), "id="+string(m[1])) || !strings.Contains(d.output(), "user="+peerUser) {
				t.Errorf("the log does not tie %s to user %s", m[1], peerUser)
			}
		})
	}

	// A wrong password is refused, through swaks too.
	out, err := exec.Command(swaks, "--server", strings.Split(starttls, ":")[0], "--port", strings.Split(starttls, ":")[1],
		"--tls", "--tls-ca-path", caFile, "--auth", "LOGIN", "--auth-user", peerUser, "--auth-password", "wrong-"+peerPassword,
		"--from", "app@example.com", "--to", "x@example.net").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "535") {
		t.Errorf("a wrong password was not refused with 535:\n%s", out)
	}
	d.stop(syscall.SIGTERM)
	assertNoSecret(t, d.output(), peerUser, peerPassword)
}

// readmePostfixLines returns the main.cf lines README.md gives for Postfix
// on the same host and on another host, and the sasl_passwd line.
func readmePostfixLines(t *testing.T) (sameHost, otherHost []string, saslPasswd string) {
	t.Helper()
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, section, ok := strings.Cut(string(b), "### Relayhost behind Postfix\n")
	if !ok {
		t.Fatal(`README.md has no "### Relayhost behind Postfix" section`)
	}
	section, _, _ = strings.Cut(section, "\n### ")
	blocks := regexp.MustCompile("(?ms)^```\n(.*?)^```$").FindAllStringSubmatch(section, -1)
	if len(blocks) != 2 {
		t.Fatalf("README's Postfix section has %d code blocks, want 2 (same host, other host)", len(blocks))
	}
	m := regexp.MustCompile("`(\\[relay\\.example\\.com\\]:587 \\S+:\\S+)`").FindStringSubmatch(section)
	if m == nil {
		t.Fatal("README's Postfix section gives no sasl_passwd line")
	}
	lines := func(s string) []string { return strings.Split(strings.TrimSpace(s), "\n") }
	return lines(blocks[0][1]), lines(blocks[1][1]), m[1]
}

// The lines the README gives must be the lines this test configures; if
// the README changes, the test changes with it.
func TestReadmePostfixLinesAreTheTestedOnes(t *testing.T) {
	same, other, passwd := readmePostfixLines(t)
	want := []string{"relayhost = [127.0.0.1]:2525", "smtp_tls_security_level = may"}
	if strings.Join(same, "\n") != strings.Join(want, "\n") {
		t.Errorf("same-host lines changed:\n%s", strings.Join(same, "\n"))
	}
	for _, must := range []string{"relayhost = [relay.example.com]:587", "smtp_tls_security_level = encrypt",
		"smtp_sasl_auth_enable = yes", "smtp_sasl_password_maps = hash:/etc/postfix/sasl_passwd"} {
		if !strings.Contains(strings.Join(other, "\n"), must) {
			t.Errorf("other-host lines lack %q (TestPostfixRelaysThroughStsrelay substitutes it)", must)
		}
	}
	if passwd != "[relay.example.com]:587 postfix:the-password" {
		t.Errorf("sasl_passwd line changed: %q", passwd)
	}
}

// postfix is a private Postfix instance: its own configuration, queue and
// data directories under a temporary directory, never the system's.
type postfix struct {
	t    *testing.T
	dir  string   // config_directory
	port string   // its SMTP listener on 127.0.0.1
	site []string // the site lines as main.cf has them
}

// startPostfix starts an instance whose main.cf holds what a private
// instance needs plus the site lines, listening for SMTP on a free
// loopback port. Its config_directory stands in for /etc/postfix in the
// site lines; maps are files to create there and index with postmap.
func startPostfix(t *testing.T, site []string, maps map[string]string) *postfix {
	t.Helper()
	requireRootTo(t, "run Postfix, which sets up its queue as root and drops to user postfix")
	bin := requireTool(t, "postfix", "postfix")
	requireTool(t, "postmap", "postfix")
	top := t.TempDir()
	// The postfix user must reach its queue and data directories.
	openToOthers(t, top)
	p := &postfix{t: t, dir: filepath.Join(top, "etc")}
	_, p.port, _ = strings.Cut(freePort(t), ":")
	os.Mkdir(p.dir, 0o755)
	os.Mkdir(filepath.Join(top, "spool"), 0o755) // Postfix makes the rest
	site = slices.Clone(site)
	for i := range site {
		site[i] = strings.ReplaceAll(site[i], "/etc/postfix/", p.dir+"/")
	}
	main := fmt.Sprintf(`# A private instance for the stsrelay tests.
compatibility_level = 3.6
queue_directory = %[1]s/spool
data_directory = %[1]s/data
maillog_file = %[1]s/maillog
maillog_file_prefixes = %[1]s
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.test
mydomain = test
myorigin = $myhostname
mydestination =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_peername_lookup = no
smtp_tls_loglevel = 1
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
# The site's lines (README.md, "Relayhost behind Postfix"):
%[2]s
`, top, strings.Join(site, "\n"))
	master := `127.0.0.1:` + p.port + ` inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
`
	os.WriteFile(filepath.Join(p.dir, "main.cf"), []byte(main), 0o644)
	os.WriteFile(filepath.Join(p.dir, "master.cf"), []byte(master), 0o644)
	for name, content := range maps {
		p.postmap(name, content)
	}
	p.site = site
	if out, err := exec.Command(bin, "-c", p.dir, "start").CombinedOutput(); err != nil {
		t.Fatalf("postfix -c %s start: %v\n%s\n%s", p.dir, err, out, p.log())
	}
	t.Cleanup(func() {
		// Stop, and wait for master to be gone before the directory is.
		pidFile := filepath.Join(top, "spool", "pid", "master.pid")
		b, _ := os.ReadFile(pidFile)
		pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		exec.Command(bin, "-c", p.dir, "stop").Run()
		for deadline := time.Now().Add(20 * time.Second); pid > 0 && time.Now().Before(deadline); {
			if syscall.Kill(pid, 0) != nil {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if t.Failed() {
			t.Logf("Postfix log:\n%s", p.log())
		}
	})
	return p
}

func (p *postfix) log() string {
	b, _ := os.ReadFile(filepath.Join(filepath.Dir(p.dir), "maillog"))
	return string(b)
}

// postmap builds an indexed map from a file in the instance's directory.
func (p *postfix) postmap(name, content string) {
	p.t.Helper()
	path := filepath.Join(p.dir, name)
	os.WriteFile(path, []byte(content), 0o600)
	if out, err := exec.Command("postmap", "-c", p.dir, "hash:"+path).CombinedOutput(); err != nil {
		p.t.Fatalf("postmap %s: %v\n%s", path, err, out)
	}
}

// submit hands Postfix a message over SMTP, as a local application would.
func (p *postfix) submit(from, to, body string) {
	p.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := smtp.Dial("127.0.0.1:" + p.port)
		if err == nil {
			err = c.SendMail(from, []string{to}, strings.NewReader(body))
			c.Close()
		}
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("submitting to Postfix: %v\n%s", err, p.log())
		}
		time.Sleep(100 * time.Millisecond) // master may still be starting smtpd
	}
}

// sinkRoute sends example.net to k, as its MX would be.
func sinkRoute(k *sink) string {
	return fmt.Sprintf("[[delivery.route]]\ndomains = [\"example.net\"]\nnexthop = %q\n", "["+strings.Replace(k.addr, ":", "]:", 1))
}

func TestPostfixRelaysThroughStsrelay(t *testing.T) {
	same, other, passwdLine := readmePostfixLines(t)

	t.Run("OtherHostSASLOverSTARTTLS", func(t *testing.T) {
		requireRootTo(t, "run Postfix")
		k := startSinkAt(t, "127.0.0.1:0", nil)
		dir := t.TempDir()
		ca := testpki.NewCA(t)
		certFile, keyFile := testpki.WriteFiles(t, dir, ca.Issue(t, "relay.test"))
		// Loopback is not trusted here: without AUTH nothing is relayed.
		config := filepath.Join(dir, "config.toml")
		os.WriteFile(config, []byte(fmt.Sprintf(`hostname = "relay.test"
state_dir = "state"
[log]
level = "debug"
[submission]
listen = "127.0.0.1:0"
tls_cert = %q
tls_key = %q
%s
[dns]
resolver = %q
%s`, certFile, keyFile, userBlock(t), dnstest.New(t).Addr, sinkRoute(k))), 0o600)
		d := startDaemon(t, config)
		relay := d.submissionAddr()

		// The README's lines, with this relay's address for
		// [relay.example.com]:587 and the instance's own sasl_passwd.
		nexthop := "[" + strings.Replace(relay, ":", "]:", 1) // [127.0.0.1]:PORT
		site := make([]string, len(other))
		for i, l := range other {
			site[i] = strings.ReplaceAll(l, "[relay.example.com]:587", nexthop)
		}
		line := strings.Replace(passwdLine, "[relay.example.com]:587", nexthop, 1)
		line = strings.Replace(line, "postfix:the-password", peerUser+":"+peerPassword, 1)
		p := startPostfix(t, site, map[string]string{"sasl_passwd": line + "\n"})
		main, _ := os.ReadFile(filepath.Join(p.dir, "main.cf"))
		for _, l := range p.site {
			if !strings.Contains(string(main), "\n"+l+"\n") {
				t.Fatalf("main.cf lacks the README line %q", l)
			}
		}

		p.submit("app@postfix.test", "user@example.net", "Subject: through Postfix\r\n\r\nrelayed by Postfix\r\n")
		msg := k.wait(t, 60*time.Second)
		if msg.From != "app@postfix.test" || len(msg.To) != 1 || msg.To[0] != "user@example.net" || !strings.Contains(msg.Data, "relayed by Postfix") {
			t.Fatalf("delivered %+v", msg)
		}
		// Postfix's hop and ours, the latter over TLS with AUTH.
		if !strings.Contains(msg.Data, "by postfix.test (Postfix)") || !regexp.MustCompile(`by relay.test \(stsrelay\) with ESMTPSA`).MatchString(msg.Data) {
			t.Errorf("Received headers do not show Postfix, then stsrelay with TLS and AUTH:\n%s", msg.Data)
		}
		if !strings.Contains(p.log(), "TLS connection established to 127.0.0.1") {
			t.Errorf("Postfix did not log a TLS connection to the relay")
		}
		d.stop(syscall.SIGTERM)
		assertNoSecret(t, d.output(), peerUser, peerPassword)
	})

	t.Run("SameHostTrustedLoopback", func(t *testing.T) {
		requireRootTo(t, "run Postfix")
		k := startSinkAt(t, "127.0.0.1:0", nil)
		dir := t.TempDir()
		addr := freePort(t)
		config := filepath.Join(dir, "config.toml")
		os.WriteFile(config, []byte(fmt.Sprintf(`hostname = "relay.test"
state_dir = "state"
[submission]
listen = %q
trusted_networks = ["127.0.0.0/8"]
[dns]
resolver = %q
%s`, addr, dnstest.New(t).Addr, sinkRoute(k))), 0o600)
		d := startDaemon(t, config)
		d.submissionAddr()
		_, port, _ := strings.Cut(addr, ":")
		site := make([]string, len(same))
		for i, l := range same {
			site[i] = strings.Replace(l, "[127.0.0.1]:2525", "[127.0.0.1]:"+port, 1)
		}
		p := startPostfix(t, site, nil)
		p.submit("app@postfix.test", "user@example.net", "Subject: same host\r\n\r\nrelayed by Postfix\r\n")
		msg := k.wait(t, 60*time.Second)
		if !strings.Contains(msg.Data, "by postfix.test (Postfix)") || !strings.Contains(msg.Data, "by relay.test (stsrelay) with ESMTP") {
			t.Errorf("Received headers:\n%s", msg.Data)
		}
		d.stop(syscall.SIGTERM)
	})
}

// stsrelay delivering to a real Postfix MX, which offers PIPELINING and
// CHUNKING: the message goes as one BDAT with its envelope (RFC 3030),
// the recipient Postfix does not know is refused on its own, and the
// mailbox gets the message as submitted, dots at line starts included.
func TestStsrelayDeliversToPostfixByBDAT(t *testing.T) {
	requireRootTo(t, "run Postfix")
	mail := t.TempDir()
	openToOthers(t, mail)
	if err := os.Chown(mail, 65534, 65534); err != nil { // nobody, who owns the mailboxes
		t.Fatal(err)
	}
	p := startPostfix(t, []string{
		"virtual_mailbox_domains = example.net",
		"virtual_mailbox_base = " + mail,
		"virtual_mailbox_maps = inline:{ bob@example.net=bob/ }",
		"virtual_minimum_uid = 100",
		"virtual_uid_maps = static:65534",
		"virtual_gid_maps = static:65534",
	}, nil)

	dir := t.TempDir()
	addr := freePort(t)
	config := filepath.Join(dir, "config.toml")
	os.WriteFile(config, []byte(fmt.Sprintf(`hostname = "relay.test"
state_dir = "state"
[submission]
listen = %q
trusted_networks = ["127.0.0.0/8"]
[dns]
resolver = %q
[[delivery.route]]
domains = ["example.net"]
nexthop = "[127.0.0.1]:%s"
`, addr, dnstest.New(t).Addr, p.port)), 0o600)
	d := startDaemon(t, config)
	d.submissionAddr()

	body := "Subject: to a Postfix MX\r\n\r\nfirst line\r\n.leading dot\r\n..two dots\r\n.\r\nlast line\r\n"
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SendMail("app@relay.test", []string{"bob@example.net", "nobody@example.net"}, strings.NewReader(body)); err != nil {
		t.Fatal(err)
	}
	c.Close()

	var got []byte
	waitUntil(t, d, "the message in bob's mailbox", func() bool {
		files, _ := filepath.Glob(filepath.Join(mail, "bob", "new", "*"))
		if len(files) == 1 {
			got, _ = os.ReadFile(files[0])
		}
		return len(files) == 1
	})
	// Postfix stores lines with LF ends.
	want := strings.ReplaceAll(body[strings.Index(body, "\r\n\r\n")+4:], "\r\n", "\n")
	if !strings.HasSuffix(string(got), "\n\n"+want) || !strings.Contains(string(got), "by relay.test (stsrelay)") {
		t.Errorf("bob's mailbox holds:\n%s\nwant the body as submitted:\n%s", got, want)
	}
	d.waitFor(`outcome=partial delivered=1 deferred=0 failed=1 .*550 5\.1\.1 .*<nobody@example.net>: Recipient address rejected`)
	// Postfix counts the commands of each session when it ends: one EHLO
	// (no STARTTLS offered here), one BDAT, no DATA.
	waitUntil(t, d, "Postfix's count of the session's commands", func() bool {
		return strings.Contains(p.log(), "disconnect from")
	})
	if m := regexp.MustCompile(`disconnect from .*`).FindString(p.log()); !strings.Contains(m, " ehlo=1 mail=1 rcpt=1/2 bdat=1 ") {
		t.Errorf("Postfix counted %q, want one EHLO, one MAIL, two RCPT (one refused) and one BDAT", m)
	}
	d.stop(syscall.SIGTERM)
}
