// Package dnssectest runs real DNSSEC on loopback for tests: it signs a
// zone with ldns-signzone, serves it (and unsigned child zones) with nsd,
// and runs unbound as the validating resolver with that zone as its only
// trust anchor and nsd as its only upstream, so no query leaves the host.
// Debian packages: nsd, unbound, ldnsutils.
package dnssectest

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// Binaries are the programs this package runs.
var Binaries = []string{"nsd", "unbound", "ldns-keygen", "ldns-signzone"}

// Require skips t when a binary is missing, or fails it under CI=true,
// where .ci/run installs them.
func Require(t testing.TB) {
	t.Helper()
	var missing []string
	for _, b := range Binaries {
		if _, err := lookPath(b); err != nil {
			missing = append(missing, b)
		}
	}
	if len(missing) == 0 {
		return
	}
	msg := fmt.Sprintf("real DNSSEC test needs %s (apt-get install nsd unbound ldnsutils)", strings.Join(missing, ", "))
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// lookPath finds a program in PATH or in the sbin folders, where Debian
// puts nsd and unbound (not in a normal user's PATH).
func lookPath(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/local/sbin"} {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", exec.ErrNotFound
}

// Zone is one zone in zone-file syntax, without SOA and NS records (they
// are added: ns.<name> at 127.0.0.1).
type Zone struct {
	Name    string   // "dane.test"
	Records []string // "mx.dane.test. 60 IN A 127.0.0.1"
}

// Env is a running nsd and unbound.
type Env struct {
	// Resolver is unbound's address, host:port, for resolve.Config.
	Resolver string
	// Authoritative is nsd's address: answers without validation.
	Authoritative string
	dir           string
}

// Start signs signed (the trust anchor), serves it and the unsigned zones
// with nsd, and starts unbound; both stop when t ends. tamper, if not nil,
// edits the signed zone text before nsd loads it, to make records bogus.
func Start(t testing.TB, signed Zone, unsigned []Zone, tamper func(string) string) *Env {
	t.Helper()
	Require(t)
	dir := t.TempDir()
	e := &Env{dir: dir}

	// The signed zone: keys, zone file, signature, trust anchor.
	ksk := e.run(t, "ldns-keygen", "-a", "ECDSAP256SHA256", "-k", signed.Name)
	zsk := e.run(t, "ldns-keygen", "-a", "ECDSAP256SHA256", signed.Name)
	zoneFile := filepath.Join(dir, signed.Name+".zone")
	write(t, zoneFile, zoneText(signed))
	e.run(t, "ldns-signzone", "-o", signed.Name, "-f", zoneFile+".signed", zoneFile, ksk, zsk)
	if tamper != nil {
		b, err := os.ReadFile(zoneFile + ".signed")
		if err != nil {
			t.Fatal(err)
		}
		write(t, zoneFile+".signed", tamper(string(b)))
	}
	anchor, err := os.ReadFile(filepath.Join(dir, ksk+".key"))
	if err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(dir, "anchor.key"), string(anchor))

	nsdPort := freePort(t)
	e.Authoritative = fmt.Sprintf("127.0.0.1:%d", nsdPort)
	var zones strings.Builder
	fmt.Fprintf(&zones, "zone:\n  name: %q\n  zonefile: %q\n", signed.Name, zoneFile+".signed")
	for _, z := range unsigned {
		f := filepath.Join(dir, z.Name+".zone")
		write(t, f, zoneText(z))
		fmt.Fprintf(&zones, "zone:\n  name: %q\n  zonefile: %q\n", z.Name, f)
	}
	nsdConf := filepath.Join(dir, "nsd.conf")
	write(t, nsdConf, fmt.Sprintf(`server:
  ip-address: 127.0.0.1
  port: %d
  do-ip6: no
  username: ""
  chroot: ""
  zonesdir: %q
  database: ""
  zonelistfile: %q
  xfrdfile: %q
  pidfile: %q
  logfile: %q
  server-count: 1
  verbosity: 1
remote-control:
  control-enable: no
%s`, nsdPort, dir, filepath.Join(dir, "zone.list"), filepath.Join(dir, "xfrd.state"),
		filepath.Join(dir, "nsd.pid"), filepath.Join(dir, "nsd.log"), zones.String()))
	e.daemon(t, "nsd", "-d", "-c", nsdConf)
	e.wait(t, e.Authoritative, signed.Name, false)

	// unbound: nsd is its only upstream; the signed zone its only anchor.
	ubPort := freePort(t)
	e.Resolver = fmt.Sprintf("127.0.0.1:%d", ubPort)
	var stubs, local strings.Builder
	seen := map[string]bool{}
	for _, z := range append([]Zone{signed}, unsigned...) {
		fmt.Fprintf(&stubs, "stub-zone:\n  name: %q\n  stub-addr: 127.0.0.1@%d\n", z.Name, nsdPort)
		// unbound answers NXDOMAIN itself for names under "test." and
		// other RFC 6761 names unless told not to.
		labels := dns.SplitDomainName(z.Name)
		if tld := labels[len(labels)-1]; !seen[tld] {
			seen[tld] = true
			fmt.Fprintf(&local, "  local-zone: %q nodefault\n", tld+".")
		}
	}
	ubConf := filepath.Join(dir, "unbound.conf")
	write(t, ubConf, fmt.Sprintf(`server:
  interface: 127.0.0.1
  port: %d
  do-ip6: no
  username: ""
  chroot: ""
  directory: %q
  pidfile: %q
  use-syslog: no
  logfile: %q
  verbosity: 1
  val-log-level: 2
  num-threads: 1
  so-reuseport: no
  do-not-query-localhost: no
  access-control: 127.0.0.0/8 allow
  module-config: "validator iterator"
  trust-anchor-file: %q
  qname-minimisation: no
  harden-referral-path: no
%sremote-control:
  control-enable: no
%sforward-zone:
  name: "."
  forward-addr: 127.0.0.1@%d
`, ubPort, dir, filepath.Join(dir, "unbound.pid"), filepath.Join(dir, "unbound.log"),
		filepath.Join(dir, "anchor.key"), local.String(), stubs.String(), nsdPort))
	e.daemon(t, "unbound", "-d", "-c", ubConf)
	e.wait(t, e.Resolver, signed.Name, true)
	return e
}

// Logs returns nsd's and unbound's logs, for a failing test to print.
func (e *Env) Logs() string {
	var b strings.Builder
	for _, f := range []string{"nsd.log", "unbound.log"} {
		data, _ := os.ReadFile(filepath.Join(e.dir, f))
		fmt.Fprintf(&b, "--- %s\n%s", f, data)
	}
	return b.String()
}

func zoneText(z Zone) string {
	var b strings.Builder
	fmt.Fprintf(&b, "$TTL 60\n%[1]s. IN SOA ns.%[1]s. hostmaster.%[1]s. 1 3600 600 86400 60\n", z.Name)
	fmt.Fprintf(&b, "%[1]s. IN NS ns.%[1]s.\nns.%[1]s. IN A 127.0.0.1\n", z.Name)
	for _, r := range z.Records {
		b.WriteString(r + "\n")
	}
	return b.String()
}

// run runs a tool in the work folder and returns its first output line.
func (e *Env) run(t testing.TB, name string, args ...string) string {
	t.Helper()
	p, err := lookPath(name)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(p, args...)
	cmd.Dir = e.dir
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, out.String(), errOut.String())
	}
	line, _, _ := strings.Cut(out.String(), "\n")
	return strings.TrimSpace(line)
}

// daemon starts a program in the foreground and kills it when t ends.
func (e *Env) daemon(t testing.TB, name string, args ...string) {
	t.Helper()
	p, err := lookPath(name)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(p, args...)
	cmd.Dir = e.dir
	out := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	go func() {
		<-done
		if t.Context().Err() == nil {
			// Died while the test runs: say so in the logs the test prints.
			f, err := os.OpenFile(filepath.Join(e.dir, name+".log"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
			if err == nil {
				fmt.Fprintf(f, "%s exited: %s\n", name, out.String())
				f.Close()
			}
		}
	}()
}

// wait polls addr until it answers for zone's SOA; with validated, until
// the answer carries AD.
func (e *Env) wait(t testing.TB, addr, zone string, validated bool) {
	t.Helper()
	c := &dns.Client{Timeout: 500 * time.Millisecond}
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(zone), dns.TypeSOA)
	q.SetEdns0(1232, true)
	q.AuthenticatedData = true
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var last string
	for ctx.Err() == nil {
		r, _, err := c.ExchangeContext(ctx, q, addr)
		switch {
		case err != nil:
			last = err.Error()
		case r.Rcode != dns.RcodeSuccess:
			last = dns.RcodeToString[r.Rcode]
		case validated && !r.AuthenticatedData:
			last = "answer without AD"
		default:
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s never answered for %s (%s)\n%s", addr, zone, last, e.Logs())
}

// freePort returns a loopback port free for both UDP and TCP just now.
func freePort(t testing.TB) int {
	t.Helper()
	for range 50 {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := pc.LocalAddr().(*net.UDPAddr).Port
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		pc.Close()
		if err == nil {
			l.Close()
			return port
		}
	}
	t.Fatal("no free loopback port")
	return 0
}

func write(t testing.TB, path, text string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
}
