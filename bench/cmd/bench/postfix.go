//go:build linux

package main

import (
	"bytes"
	"context"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// resolverAddr is where postfix-mta-sts-resolver answers Postfix's
// socketmap lookups.
const resolverAddr = "127.0.25.20:8461"

// postfixSys is a private Postfix instance (its own config, queue and
// data directories; `postfix -c DIR start`) with postfix-mta-sts-resolver
// as its smtp_tls_policy_maps, as Debian users set it up. It never touches
// the system's instance.
type postfixSys struct {
	env   *env
	reuse bool // smtp_tls_connection_reuse

	dir      string
	master   int
	resolver *exec.Cmd
	resDone  chan struct{}
}

func (p *postfixSys) stateDirs() []string { return []string{"queue", "data"} }

func (p *postfixSys) etc() string { return filepath.Join(p.dir, "etc") }

func (p *postfixSys) start(ctx context.Context, sc *scenario, dir string, _ runOptions) error {
	p.dir = dir
	for _, d := range []string{"etc", "etc/sasl", "queue", "data", "log"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	pf, err := user.Lookup("postfix")
	if err != nil {
		return fmt.Errorf("postfix user: %w (is the postfix package installed?)", err)
	}
	uid, _ := strconv.Atoi(pf.Uid)
	gid, _ := strconv.Atoi(pf.Gid)
	// Postfix writes data/ and log/ as its own user (postsuper logs the
	// renaming of copied queue files before postlogd runs).
	for _, d := range []string{"data", "log"} {
		if err := chownTree(filepath.Join(dir, d), uid, gid); err != nil {
			return err
		}
	}
	if err := p.writeConfig(sc, gid); err != nil {
		return err
	}
	if err := p.startResolver(ctx); err != nil {
		return err
	}
	// `postfix start` creates missing queue directories, renames copied
	// queue files after their new inodes (postsuper) and starts master.
	if out, err := p.postfix("start"); err != nil {
		p.stopResolver()
		return fmt.Errorf("postfix start: %v: %s (see %s)", err, out, p.maillog())
	}
	pid, err := p.masterPID()
	if err != nil {
		p.stop()
		return err
	}
	p.master = pid
	if err := waitBanner(ctx, submitAddr, nil, p.maillog()); err != nil {
		p.stop()
		return err
	}
	return nil
}

func (p *postfixSys) maillog() string { return filepath.Join(p.dir, "log", "maillog") }

// writeConfig writes main.cf, master.cf and the SASL files. Everything
// not listed keeps Debian's defaults (smtp_tls_session_cache_database is
// set as Debian's main.cf sets it).
func (p *postfixSys) writeConfig(sc *scenario, postfixGID int) error {
	relayRestrictions := "permit_mynetworks, permit_sasl_authenticated, reject"
	if sc.auth {
		relayRestrictions = "permit_sasl_authenticated, reject"
	}
	reuse := "no"
	if p.reuse {
		reuse = "yes"
	}
	mainCf := fmt.Sprintf(`compatibility_level = 3.6
queue_directory = %[1]s/queue
data_directory = %[1]s/data
maillog_file = %[1]s/log/maillog
maillog_file_prefixes = %[1]s/log
myhostname = postfix.bench.example
mydomain = bench.example
myorigin = $myhostname
mydestination =
# master.cf binds the submission address; "loops back to myself" checks use this.
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
local_recipient_maps =
biff = no
smtpd_relay_restrictions = %[2]s
smtpd_tls_cert_file = %[3]s
smtpd_tls_key_file = %[4]s
smtpd_tls_security_level = may
smtpd_tls_auth_only = yes
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = %[1]s/etc/sasl
smtp_tls_security_level = may
smtp_tls_CAfile = %[5]s
smtp_tls_session_cache_database = btree:${data_directory}/smtp_scache
smtp_tls_policy_maps = socketmap:inet:%[6]s:postfix
smtp_tls_connection_reuse = %[7]s
# Deferred mail stays put during a run.
minimal_backoff_time = 1h
maximal_backoff_time = 4h
queue_run_delay = 1h
`, p.dir, relayRestrictions, p.env.relayCert, p.env.relayKey, p.env.caFile, resolverAddr, reuse)
	// No chroot: the services read the private resolv.conf and CA file.
	masterCf := submitAddr + ` inet n - n - - smtpd
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
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
tlsproxy  unix  -       -       n       -       0       tlsproxy
postlog   unix-dgram n  -       n       -       1       postlogd
`
	sasldb := filepath.Join(p.etc(), "sasl", "sasldb2")
	saslConf := "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\nsasldb_path: " + sasldb + "\n"
	for name, text := range map[string]string{"main.cf": mainCf, "master.cf": masterCf, "sasl/smtpd.conf": saslConf} {
		if err := os.WriteFile(filepath.Join(p.etc(), name), []byte(text), 0o644); err != nil {
			return err
		}
	}
	// Cyrus looks "app@bench.example" up as user app in realm bench.example.
	u, realm, _ := strings.Cut(p.env.user, "@")
	cmd := exec.Command("saslpasswd2", "-f", sasldb, "-c", "-p", "-u", realm, u)
	cmd.Stdin = strings.NewReader(p.env.password)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("saslpasswd2: %v: %s", err, out)
	}
	if err := os.Chown(sasldb, 0, postfixGID); err != nil {
		return err
	}
	return os.Chmod(sasldb, 0o640)
}

// startResolver runs postfix-mta-sts-resolver with a fresh SQLite cache
// (Debian's default cache type), trusting the bench CA.
func (p *postfixSys) startResolver(ctx context.Context) error {
	host, port, _ := net.SplitHostPort(resolverAddr)
	conf := fmt.Sprintf("host: %s\nport: %s\nreuse_port: true\ncache:\n  type: sqlite\n  options:\n    filename: %q\n",
		host, port, filepath.Join(p.dir, "mta-sts-cache.db"))
	confFile := filepath.Join(p.dir, "mta-sts-daemon.yml")
	if err := os.WriteFile(confFile, []byte(conf), 0o644); err != nil {
		return err
	}
	logFile := filepath.Join(p.dir, "mta-sts-daemon.log")
	p.resolver = exec.Command("mta-sts-daemon", "-c", confFile, "-v", "warn", "-l", logFile)
	p.resolver.Env = append(os.Environ(), "SSL_CERT_FILE="+p.env.caFile, "SSL_CERT_DIR=/nonexistent")
	if err := p.resolver.Start(); err != nil {
		return fmt.Errorf("mta-sts-daemon: %w (is postfix-mta-sts-resolver installed?)", err)
	}
	p.resDone = make(chan struct{})
	go func() {
		p.resolver.Wait()
		close(p.resDone)
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.DialTimeout("tcp", resolverAddr, time.Second); err == nil {
			c.Close()
			return nil
		}
		select {
		case <-p.resDone:
			return fmt.Errorf("mta-sts-daemon exited during start-up; see %s", logFile)
		case <-ctx.Done():
			p.stopResolver()
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.stopResolver()
			return fmt.Errorf("mta-sts-daemon did not listen on %s within 30s; see %s", resolverAddr, logFile)
		}
	}
}

func (p *postfixSys) stopResolver() {
	if p.resolver == nil {
		return
	}
	p.resolver.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.resDone:
	case <-time.After(25 * time.Second):
		p.resolver.Process.Kill()
		<-p.resDone
	}
	p.resolver = nil
}

func (p *postfixSys) postfix(args ...string) ([]byte, error) {
	cmd := exec.Command("postfix", append([]string{"-c", p.etc()}, args...)...)
	return cmd.CombinedOutput()
}

func (p *postfixSys) masterPID() (int, error) {
	f := filepath.Join(p.dir, "queue", "pid", "master.pid")
	deadline := time.Now().Add(30 * time.Second)
	for {
		b, err := os.ReadFile(f)
		if err == nil {
			if pid, err := strconv.Atoi(string(bytes.TrimSpace(b))); err == nil && pid > 0 {
				return pid, nil
			}
		}
		if time.Now().After(deadline) {
			return 0, fmt.Errorf("postfix: no master PID in %s; see %s", f, p.maillog())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (p *postfixSys) pids() []int {
	var out []int
	if p.master > 0 {
		out = append(out, p.master)
	}
	if p.resolver != nil {
		out = append(out, p.resolver.Process.Pid)
	}
	return out
}

// stop stops this instance's master (which stops its children) and the
// resolver, and waits until they are gone.
func (p *postfixSys) stop() error {
	defer p.stopResolver()
	if p.master == 0 {
		p.postfix("stop")
		return nil
	}
	out, err := p.postfix("stop")
	deadline := time.Now().Add(60 * time.Second)
	for alive(p.master) {
		if time.Now().After(deadline) {
			p.postfix("abort")
			syscall.Kill(p.master, syscall.SIGKILL)
			return fmt.Errorf("postfix master %d did not stop within 60s (postfix stop: %v %s)", p.master, err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	p.master = 0
	return nil
}

func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// A zombie has exited; its parent has not reaped it yet.
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}

func (p *postfixSys) counters() map[string]float64 { return nil }

// deferredCount counts the queue files in the deferred queue.
func (p *postfixSys) deferredCount() (int, error) {
	n := 0
	err := filepath.WalkDir(filepath.Join(p.dir, "queue", "deferred"), func(_ string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			n++
		}
		return nil
	})
	return n, err
}

func chownTree(dir string, uid, gid int) error {
	return filepath.WalkDir(dir, func(path string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(path, uid, gid)
	})
}
