package config

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/admin"
	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/resolve"
	"github.com/stsrelay/stsrelay/smtpin"
	"github.com/stsrelay/stsrelay/sts"
)

// A bcrypt hash of "secret" (cost 4), valid in form.
const testHash = "$2a$04$Q0Gm3cH8mZbV3dM3mR2o7.j7m5VwqkFQ0m3lq8t6Gq7dSxYtq9W2e"

func TestExampleLoadsAndMatchesDefaults(t *testing.T) {
	cfg, err := Load("../config.toml.example")
	if err != nil {
		t.Fatalf("config.toml.example: %v", err)
	}
	if cfg.Submission.Listen != "127.0.0.1:2525" {
		t.Errorf("listen = %q, want 127.0.0.1:2525 (the example runs on a fresh clone)", cfg.Submission.Listen)
	}
	if want, _ := filepath.Abs("../var"); cfg.StateDir != want {
		t.Errorf("state_dir = %q, want %s (relative to the config file, made absolute)", cfg.StateDir, want)
	}
	// Every value the example states outside [submission]/state_dir must be
	// the documented default, so the comments cannot drift from the code.
	def := Default()
	for _, c := range []struct {
		name      string
		got, want any
	}{
		{"log", cfg.Log, def.Log},
		{"dns", cfg.DNS, def.DNS},
		{"delivery", cfg.Delivery, def.Delivery},
		{"sts", cfg.STS, def.STS},
		{"dane", cfg.DANE, def.DANE},
		{"tlsrpt", cfg.TLSRPT, def.TLSRPT},
		{"metrics", cfg.Metrics, def.Metrics},
		{"submission.max_message_size", cfg.Submission.MaxMessageSize, def.Submission.MaxMessageSize},
		{"submission.auth_limit", cfg.Submission.AuthRate, def.Submission.AuthRate},
		{"submission.command_timeout", cfg.Submission.CommandTimeout, def.Submission.CommandTimeout},
		{"submission.max_connections", cfg.Submission.MaxConns, def.Submission.MaxConns},
		{"submission.max_hops", cfg.Submission.MaxHops, def.Submission.MaxHops},
		{"submission.max_connections_per_ip", cfg.Submission.MaxConnsPerIP, def.Submission.MaxConnsPerIP},
	} {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("%s: example says %+v, default is %+v", c.name, c.got, c.want)
		}
	}
}

func TestProductionExampleLoads(t *testing.T) {
	cfg, err := Load("../config.production.toml.example")
	if err != nil {
		t.Fatalf("config.production.toml.example: %v", err)
	}
	if cfg.HostnameFromSystem || cfg.StateDir != "/var/lib/stsrelay" || cfg.Submission.TLSKey == "" ||
		len(cfg.Submission.Users) == 0 || cfg.Log.Format != "json" {
		t.Errorf("the production example is not a production setup: %+v", cfg)
	}
}

func TestDefaultsApplyToEmptyFile(t *testing.T) {
	cfg, err := Parse([]byte("hostname = \"relay.example.com\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Delivery.MaxQueueTime.Duration != 120*time.Hour {
		t.Errorf("max_queue_time = %s, want 120h", cfg.Delivery.MaxQueueTime)
	}
	if cfg.Submission.MaxMessageSize != 35<<20 {
		t.Errorf("max_message_size = %d, want 35 MiB", cfg.Submission.MaxMessageSize)
	}
	if !cfg.STS.Enabled || cfg.STS.MatchCNAMETarget {
		t.Errorf("sts = %+v, want enabled without match_cname_target", cfg.STS)
	}
	if cfg.StateDir != "/var/lib/stsrelay" {
		t.Errorf("state_dir = %q", cfg.StateDir)
	}
}

func TestParsesEveryKind(t *testing.T) {
	cfg, err := Parse([]byte(`
hostname = "relay.example.com"
[submission]
listen = ":587"
listen_tls = ":465"
tls_cert = "cert.pem"
tls_key = "key.pem"
trusted_networks = ["10.1.2.0/24", "2001:db8::1"]
max_message_size = "512KB"
[[submission.users]]
name = "app"
password_hash = "` + testHash + `"
allowed_senders = ["*@example.com", "bob@example.org", "*@bücher.example"]
[[submission.users]]
name = "cron"
password_hash = "` + testHash + `"
[delivery]
retry_schedule = ["1m", "1h30m"]
ip_version = "6"
[[delivery.policy]]
domain = "Partner.Example."
tls = "verify"
[[delivery.policy]]
domain = "dane.example"
tls = "dane"
[dane]
trust_remote_resolver = true
`))
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.Submission.MaxMessageSize; got != 512<<10 {
		t.Errorf("size = %d", got)
	}
	if n := cfg.Submission.TrustedNetworks; len(n) != 2 || n[0].String() != "10.1.2.0/24" || n[1].String() != "2001:db8::1/128" {
		t.Errorf("trusted_networks = %v", n)
	}
	if u := cfg.Submission.Users; len(u) != 2 || u[0].AllowedSenders[1] != "bob@example.org" || u[0].AllowedSenders[2] != "*@bücher.example" || u[1].Name != "cron" {
		t.Errorf("users = %+v", u)
	}
	if r := cfg.Delivery.RetrySchedule; len(r) != 2 || r[1].Duration != 90*time.Minute {
		t.Errorf("retry_schedule = %v", r)
	}
	if p := cfg.Delivery.Policies; len(p) != 2 || len(p[0].Domains) != 1 || p[0].Domains[0] != "partner.example" || p[1].TLS != "dane" {
		t.Errorf("policy = %+v, want the domain lower-cased without the dot", p)
	}
	if !cfg.DANE.Enabled || !cfg.DANE.TrustRemoteResolver {
		t.Errorf("dane = %+v", cfg.DANE)
	}
}

func TestRejectsBadInput(t *testing.T) {
	for _, c := range []struct {
		name, toml string
		want       string // the error must contain this
	}{
		{"syntax", "hostname = \n", "line 1"},
		{"unknown top-level key", "hostname = \"a.example\"\nhostnme = \"x\"\n", "line 2: hostnme: unknown key"},
		{"unknown nested key", "hostname = \"a.example\"\n[delivery]\nworkers = 3\nmax_age = 4\n", "line 4: delivery.max_age: unknown key"},
		{"bad size", "[submission]\nmax_message_size = \"35XB\"\n", `line 2: submission.max_message_size: "35XB" is not a size (use e.g. 35MB)`},
		{"bad duration", "[delivery]\nmax_queue_time = \"5 days\"\n", `line 2: delivery.max_queue_time: "5 days" is not a duration`},
		{"bad duration in list", "[delivery]\nretry_schedule = [\"5m\", \"soon\"]\n", `"soon" is not a duration`},
		{"wrong type", "[delivery]\nworkers = \"ten\"\n", "line 2: delivery.workers: is a string, want a whole number (no quotes)"},
		{"string for a list", "[submission]\ntrusted_networks = \"10.0.0.0/8\"\n", "line 2: submission.trusted_networks: is a string, want a list in brackets"},
		{"number for a string", "[log]\nlevel = 3\n", "line 2: log.level: is a number, want a string in quotes"},
		{"unknown table", "hostname = \"a.example\"\n[log]\nlevel = \"info\"\n\n[foo]\n", "line 5: foo: unknown table"},
		{"unknown table with keys", "[log]\nlevel = \"info\"\n[foo]\nbar = 1\n", "line 3: foo: unknown table"},
		{"unknown nested table", "[submission]\nlisten = \":587\"\n[submission.limits]\nx = 1\n", "line 3: submission.limits: unknown table"},
		{"unterminated table header", "[log]\nlevel = \"info\"\n\n[delivery\nworkers = 3\n", "line 4: expected"},
		{"syntax error after a table", "[log]\nlevel=info\n", "line 2: expected"},
		{"auth limit per ip below failures", "[submission.auth_limit]\nfailures = 10\nfailures_per_ip = 5\n", "line 3: submission.auth_limit.failures_per_ip: must be at least failures"},
		{"bad network", "[submission]\ntrusted_networks = [\"10.0.0.0/33\"]\n", `line 2: submission.trusted_networks: "10.0.0.0/33" is not an IP network`},
		{"bad level", "[log]\nlevel = \"loud\"\n", `line 2: log.level: "loud" is not a level`},
		{"bad format", "[log]\nformat = \"xml\"\n", "log.format"},
		{"bad hostname", "hostname = \"not a name\"\n", "line 1: hostname: \"not a name\" is not a host name"},
		{"no listener", "[submission]\nlisten = \"\"\n", "line 2: submission.listen: no listener"},
		{"bad listen", "[submission]\nlisten = \"localhost\"\n", `line 2: submission.listen: "localhost" is not host:port`},
		{"bad metrics listen", "[metrics]\nlisten = \"9100\"\n", "metrics.listen"},
		{"pprof without listener", "[metrics]\npprof = true\n", "line 2: metrics.pprof: needs metrics.listen"},
		{"cert without key", "[submission]\ntls_cert = \"c.pem\"\n", "tls_cert and tls_key go together"},
		{"implicit TLS without cert", "[submission]\nlisten_tls = \":465\"\n", "line 2: submission.listen_tls: implicit TLS needs"},
		{"zero recipients", "[submission]\nmax_recipients = 0\n", "line 2: submission.max_recipients: must be positive"},
		{"zero hops", "[submission]\nmax_hops = 0\n", "line 2: submission.max_hops: must be positive"},
		{"negative hops", "[submission]\nmax_hops = -5\n", "line 2: submission.max_hops: must be positive"},
		{"negative conns", "[submission]\nmax_connections_per_ip = -1\n", "submission.max_connections_per_ip"},
		{"zero conns", "[submission]\nmax_connections_per_ip = 0\n", "line 2: submission.max_connections_per_ip: must be positive"},
		{"key in another case", "[delivery]\nworkers = 3\nWorkers = 5\n", "line 3: delivery.Workers: unknown key (keys are case-sensitive: delivery.workers)"},
		{"table in another case", "[Delivery]\nworkers = 3\n", "unknown key (keys are case-sensitive: delivery)"},
		{"a route's limit in another case", "[[delivery.route]]\ndomains = [\"*\"]\nnexthop = \"a.example\"\nmax_connections = 1\nMAX_CONNECTIONS = 7\n",
			"line 5: delivery.route[0].MAX_CONNECTIONS: unknown key (keys are case-sensitive: delivery.route[0].max_connections)"},
		{"a limit's rate in another case", "[[delivery.limits]]\ndomains = [\"a.example\"]\nRate = \"5/s\"\n",
			"line 3: delivery.limits[0].Rate: unknown key (keys are case-sensitive: delivery.limits[0].rate)"},
		{"zero total conns", "[submission]\nmax_connections = 0\n", "line 2: submission.max_connections: must be at least max_connections_per_ip (20), got 0"},
		{"total under per-IP", "[submission]\nmax_connections_per_ip = 50\nmax_connections = 40\n", "line 3: submission.max_connections: must be at least"},
		{"plaintext password", "[[submission.users]]\nname = \"a\"\npassword_hash = \"hunter2\"\n", "line 3: submission.users[0].password_hash: is not a bcrypt hash"},
		{"empty user name", "[[submission.users]]\nname = \"\"\npassword_hash = \"" + testHash + "\"\n", "submission.users[0].name: must not be empty"},
		{"duplicate user", "[[submission.users]]\nname = \"a\"\npassword_hash = \"" + testHash + "\"\n[[submission.users]]\nname = \"a\"\npassword_hash = \"" + testHash + "\"\n", "line 5: submission.users[1].name: user \"a\" is defined twice"},
		{"bad sender pattern", "[[submission.users]]\nname = \"a\"\npassword_hash = \"" + testHash + "\"\nallowed_senders = [\"example.com\"]\n", "line 4: submission.users[0].allowed_senders"},
		{"sender pattern's domain no IDNA name", "[[submission.users]]\nname = \"a\"\npassword_hash = \"" + testHash + "\"\nallowed_senders = [\"*@bücher..example\"]\n", "line 4: submission.users[0].allowed_senders"},
		{"sender pattern's A-label no A-label", "[[submission.users]]\nname = \"a\"\npassword_hash = \"" + testHash + "\"\nallowed_senders = [\"*@xn--zz.example\"]\n", "line 4: submission.users[0].allowed_senders"},
		{"postmaster without a domain", "[submission]\npostmaster = \"ops\"\n", "line 2: submission.postmaster"},
		{"postmaster's local part in UTF-8", "[submission]\npostmaster = \"jörg@example.com\"\n", "line 2: submission.postmaster"},
		{"star inside a local part", "[[submission.users]]\nname = \"a\"\npassword_hash = \"" + testHash + "\"\nallowed_senders = [\"no*reply@example.com\"]\n", "line 4: submission.users[0].allowed_senders"},
		{"bad resolver", "[dns]\nresolver = \"127.0.0.1\"\n", `line 2: dns.resolver: "127.0.0.1" is not host:port`},
		{"zero dns timeout", "[dns]\ntimeout = \"0s\"\n", "dns.timeout"},
		{"zero workers", "[delivery]\nworkers = 0\n", "line 2: delivery.workers: must be positive"},
		{"zero conns per domain", "[delivery]\nmax_connections_per_domain = 0\n", "delivery.max_connections_per_domain"},
		{"empty retry schedule", "[delivery]\nretry_schedule = []\n", "delivery.retry_schedule: needs at least one"},
		{"negative retry", "[delivery]\nretry_schedule = [\"-5m\"]\n", "intervals must be positive"},
		{"zero queue time", "[delivery]\nmax_queue_time = \"0s\"\n", "delivery.max_queue_time"},
		{"negative delay notice", "[delivery]\ndelay_notice_after = \"-1h\"\n", "delivery.delay_notice_after"},
		{"zero connect timeout", "[delivery]\nconnect_timeout = \"0s\"\n", "delivery.connect_timeout"},
		{"bad ip version", "[delivery]\nip_version = \"5\"\n", `line 2: delivery.ip_version: "5" is not allowed`},
		{"bad policy tls", "[[delivery.policy]]\ndomain = \"a.example\"\ntls = \"secure\"\n", `line 3: delivery.policy[0].tls: "secure" is not a TLS policy`},
		{"bad policy domain", "[[delivery.policy]]\ndomain = \"a b\"\ntls = \"may\"\n", "line 2: delivery.policy[0].domain"},
		{"duplicate policy", "[[delivery.policy]]\ndomain = \"a.example\"\ntls = \"may\"\n[[delivery.policy]]\ndomain = \"A.example\"\ntls = \"none\"\n", "line 5: delivery.policy[1].domain: overlaps delivery.policy[0] (line 2): both match domain a.example"},
		{"zero fetch timeout", "[sts]\nfetch_timeout = \"0s\"\n", "sts.fetch_timeout"},
		{"fetch timeout past its bound", "[sts]\nfetch_timeout = \"10m\"\n", "line 2: sts.fetch_timeout: 10m0s is too long: at most 2m0s"},
		{"tlsrpt without organization", "[tlsrpt]\nenabled = true\n", "tlsrpt.organization_name: must be set"},
		{"tlsrpt without contact", "[tlsrpt]\nenabled = true\norganization_name = \"Example\"\n", "tlsrpt.contact_info: must be set"},
		{"tlsrpt contact not an address", "[tlsrpt]\nenabled = true\norganization_name = \"Example\"\ncontact_info = \"https://example.com/contact\"\n", "line 4: tlsrpt.contact_info: \"https://example.com/contact\" is not an email address"},
		{"tlsrpt sender not an address", "[tlsrpt]\nenabled = true\norganization_name = \"Example\"\ncontact_info = \"t@example.com\"\nreport_sender = \"noreply\"\n", "line 5: tlsrpt.report_sender"},
		{"tlsrpt zero delay", "[tlsrpt]\nmax_delay = \"0s\"\n", "line 2: tlsrpt.max_delay: must be positive"},
		{"tlsrpt delay past the day", "[tlsrpt]\nmax_delay = \"30h\"\n", "tlsrpt.max_delay"},
		{"dkim bad domain", "[[dkim]]\ndomain = \"example\"\nselector = \"s1\"\nkey_file = \"k.pem\"\n", "line 2: dkim[0].domain"},
		{"dkim bad selector", "[[dkim]]\ndomain = \"example.com\"\nselector = \"s 1\"\nkey_file = \"k.pem\"\n", "line 3: dkim[0].selector"},
		{"dkim no key", "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\n", "dkim[0].key_file: must be set"},
		{"dkim twice", "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_file = \"a.pem\"\n[[dkim]]\ndomain = \"Example.com.\"\nselector = \"s1\"\nkey_file = \"b.pem\"\n", "s1._domainkey.example.com is defined twice"},
		{"dkim sign_relayed not a bool", "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_file = \"a.pem\"\nsign_relayed = \"yes\"\n", "sign_relayed"},
		{"dkim unknown key", "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_file = \"a.pem\"\nsign_all = true\n", "dkim.sign_all: unknown key"},
		{"auth limit failures", "[submission.auth_limit]\nfailures = 0\n", "line 2: submission.auth_limit.failures: must be positive"},
		{"auth limit per", "[submission.auth_limit]\nper = \"0s\"\n", "line 2: submission.auth_limit.per: must be positive"},
		{"zero command timeout", "[submission]\ncommand_timeout = \"0s\"\n", "line 2: submission.command_timeout: must be positive"},
		{"zero data timeout", "[submission]\ndata_timeout = \"0s\"\n", "line 2: submission.data_timeout: must be positive"},
	} {
		t.Run(c.name, func(t *testing.T) {
			def := Default()
			def.Hostname = "relay.example.com" // independent of this machine's name
			_, err := parse([]byte(c.toml), def)
			if err == nil {
				t.Fatalf("no error for\n%s", c.toml)
			}
			// A syntax error names its line, never the table before it.
			if strings.Contains(err.Error(), ": log: ") || strings.Contains(err.Error(), "last key") {
				t.Fatalf("error %q names the wrong place", err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %q\ndoes not contain %q", err, c.want)
			}
			if strings.Contains(err.Error(), "\n") {
				t.Fatalf("error %q is not one line", err)
			}
		})
	}
}

func TestLoadErrorsNameTheFile(t *testing.T) {
	dir := t.TempDir()
	if _, err := Load(filepath.Join(dir, "missing.toml")); err == nil || !strings.Contains(err.Error(), "missing.toml: no such file") {
		t.Errorf("missing file: %v", err)
	}
	bad := filepath.Join(dir, "bad.toml")
	os.WriteFile(bad, []byte("[delivery]\nworkers = 0\n"), 0o600)
	if _, err := Load(bad); err == nil || !strings.HasPrefix(err.Error(), "config "+bad+": line 2: delivery.workers") {
		t.Errorf("bad file: %v", err)
	}
	if os.Getuid() != 0 { // root reads everything
		unreadable := filepath.Join(dir, "unreadable.toml")
		os.WriteFile(unreadable, nil, 0o000)
		if _, err := Load(unreadable); err == nil || !strings.Contains(err.Error(), "permission denied") {
			t.Errorf("unreadable file: %v", err)
		}
	}
}

func TestLoadResolvesPathsAgainstTheConfigFolder(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "c.toml")
	os.WriteFile(p, []byte("hostname = \"a.example\"\nstate_dir = \"state\"\n[submission]\ntls_cert = \"c.pem\"\ntls_key = \"/k.pem\"\n[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_file = \"dkim/s1.pem\"\n"), 0o600)
	cfg, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.StateDir != filepath.Join(dir, "state") || cfg.Submission.TLSCert != filepath.Join(dir, "c.pem") || cfg.Submission.TLSKey != "/k.pem" {
		t.Errorf("paths = %q %q %q", cfg.StateDir, cfg.Submission.TLSCert, cfg.Submission.TLSKey)
	}
	if len(cfg.DKIM) != 1 || cfg.DKIM[0].KeyFile != filepath.Join(dir, "dkim/s1.pem") {
		t.Errorf("dkim = %+v, want key_file relative to the config folder", cfg.DKIM)
	}
}

// The control socket must fit a unix socket address: the longest
// state_dir that does is taken and can be listened on, one byte more is
// refused at load, naming state_dir, rather than by bind(2) with EINVAL.
func TestLoadRefusesAStateDirTooLongForTheControlSocket(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "c.toml")
	fits := len(syscall.RawSockaddrUnix{}.Path) - 1 - len("/"+admin.SocketName)
	for _, extra := range []int{0, 1} {
		stateDir := dir + "/" + strings.Repeat("s", fits+extra-len(dir)-1)
		os.WriteFile(p, []byte("hostname = \"a.example\"\nstate_dir = \""+stateDir+"\"\n"), 0o600)
		cfg, err := Load(p)
		if extra == 0 {
			if err != nil {
				t.Fatalf("state_dir of %d bytes: %v", len(stateDir), err)
			}
			os.MkdirAll(cfg.StateDir, 0o700)
			ln, err := net.Listen("unix", filepath.Join(cfg.StateDir, admin.SocketName))
			if err != nil {
				t.Fatalf("the longest state_dir taken cannot hold the socket: %v", err)
			}
			ln.Close()
			continue
		}
		if err == nil || !strings.Contains(err.Error(), "line 2: state_dir: the control socket") ||
			!strings.Contains(err.Error(), "too long for a unix socket") {
			t.Errorf("state_dir of %d bytes: %v", len(stateDir), err)
		}
	}
}

func TestDKIMSignRelayed(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "c.toml")
	// One sign_relayed key per domain; a parent and its subdomain may each
	// have one (the closest wins), and other keys of the domain may not.
	os.WriteFile(p, []byte(`hostname = "a.example"
[[dkim]]
domain = "example.com"
selector = "s1"
key_file = "a.pem"
sign_relayed = true
[[dkim]]
domain = "mail.example.com"
selector = "s1"
key_file = "b.pem"
sign_relayed = true
[[dkim]]
domain = "example.com"
selector = "reports"
key_file = "c.pem"
`), 0o600)
	cfg, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.DKIM) != 3 || !cfg.DKIM[0].SignRelayed || !cfg.DKIM[1].SignRelayed || cfg.DKIM[2].SignRelayed {
		t.Errorf("dkim = %+v", cfg.DKIM)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"0": 0, "100": 100, "100B": 100, "1KB": 1024, "2 MB": 2 << 20, "1GiB": 1 << 30, "35mb": 35 << 20} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "MB", "-1MB", "1.5MB", "35XB", "99999999999GB"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%q) accepted", in)
		}
	}
}

const routesTOML = `hostname = "relay.example.com"
[[delivery.route]]
domains = ["*"]
nexthop = "smtp.provider.test:587"
auth_username = "relay"
auth_password_file = "upstream.pass"
max_connections = 4
rate = "600/m"

[[delivery.route]]
domains = ["internal.example", ".internal.example"]
nexthop = "[192.0.2.25]:2525"
tls = "none"

[[delivery.route]]
domains = ["*"]
senders = ["@tenant.example", "boss@Tenant.example"]
nexthop = "[smtp.provider.test]:465"
implicit_tls = true
tls = "verify"

[[delivery.limits]]
mx_hosts = [".google.com"]
max_connections = 5
max_messages_per_connection = 100

[[delivery.limits]]
domains = ["Big.Example."]
rate = "10/s"
`

func TestLoadsRoutesLimitsAndPasswordFiles(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "upstream.pass"), []byte("s3cret-pw\n"), 0o600)
	p := filepath.Join(dir, "c.toml")
	os.WriteFile(p, []byte(routesTOML), 0o600)
	cfg, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	r := cfg.Delivery.Routes
	if len(r) != 3 || r[0].AuthPassword.Reveal() != "s3cret-pw" || r[0].AuthPasswordFile != filepath.Join(dir, "upstream.pass") {
		t.Fatalf("routes = %+v", r)
	}
	if r[0].MaxConnections != 4 || r[0].Rate.PerSecond() != 10 || r[2].Senders[1] != "boss@Tenant.example" || !r[2].ImplicitTLS {
		t.Errorf("routes = %+v", r)
	}
	l := cfg.Delivery.Limits
	if len(l) != 2 || l[0].MXHosts[0] != ".google.com" || l[1].Domains[0] != "big.example" || l[1].Rate.PerSecond() != 10 {
		t.Errorf("limits = %+v", l)
	}
	// The password never shows when the configuration is printed.
	for _, out := range []string{fmt.Sprintf("%v %+v %#v %s", cfg, cfg, cfg, r[0].AuthPassword)} {
		if strings.Contains(out, "s3cret-pw") {
			t.Errorf("password printed: %s", out)
		}
	}
	if b, _ := json.Marshal(cfg); strings.Contains(string(b), "s3cret-pw") {
		t.Error("password in JSON")
	}
}

func TestParseRate(t *testing.T) {
	for in, want := range map[string]float64{"600/m": 10, "10/s": 10, "3600/h": 1, "100/10s": 10, " 5 / 1s ": 5} {
		var r Rate
		if err := r.UnmarshalText([]byte(in)); err != nil || r.PerSecond() != want {
			t.Errorf("rate %q = %v (%v), want %v/s", in, r.PerSecond(), err, want)
		}
	}
	for _, bad := range []string{"600", "600/", "/m", "0/m", "-1/m", "ten/m", "5/0s", "5/x"} {
		var r Rate
		if err := r.UnmarshalText([]byte(bad)); err == nil {
			t.Errorf("rate %q accepted", bad)
		}
	}
}

func TestRejectsBadRoutesAndLimits(t *testing.T) {
	route := func(extra string) string {
		return "[[delivery.route]]\ndomains = [\"*\"]\nnexthop = \"[192.0.2.1]:25\"\n" + extra
	}
	for _, c := range []struct{ name, toml, want string }{
		{"unknown tls", route("tls = \"secure\"\n"), `line 4: delivery.route[0].tls: "secure" is not a TLS level (use may, encrypt, verify, dane, dane-only, none)`},
		{"nexthop does not parse", "[[delivery.route]]\ndomains = [\"*\"]\nnexthop = \"host:99999\"\n", `line 3: delivery.route[0].nexthop: "host:99999" is not a nexthop`},
		{"address without brackets", "[[delivery.route]]\ndomains = [\"*\"]\nnexthop = \"192.0.2.1:25\"\n", "line 3: delivery.route[0].nexthop: \"192.0.2.1:25\" is not a nexthop: an address goes in brackets"},
		{"no nexthop", "[[delivery.route]]\ndomains = [\"*\"]\n", "delivery.route[0].nexthop: must be set"},
		{"no domains", "[[delivery.route]]\nnexthop = \"a.example\"\n", "line 1: delivery.route[0].domains: must list at least one"},
		{"bad domain pattern", "[[delivery.route]]\ndomains = [\"*.example.org\"]\nnexthop = \"a.example\"\n", `line 2: delivery.route[0].domains: "*.example.org" is not a domain pattern`},
		{"bad sender", route("senders = [\"tenant.example\"]\n"), `line 4: delivery.route[0].senders: "tenant.example" is not a sender pattern`},
		{"username without file", route("auth_username = \"u\"\n"), "line 4: delivery.route[0].auth_username: auth_username and auth_password_file go together"},
		{"auth in the clear", route("auth_username = \"u\"\nauth_password_file = \"/p\"\ntls = \"none\"\n"), "line 6: delivery.route[0].tls: \"none\" with credentials"},
		{"implicit tls none", route("implicit_tls = true\ntls = \"none\"\n"), "delivery.route[0].tls: \"none\" contradicts implicit_tls"},
		{"dane-only to an address", route("tls = \"dane-only\"\n"), `line 4: delivery.route[0].tls: "dane-only" needs a host name nexthop`},
		{"dane-only with DANE off", "[dane]\nenabled = false\n[[delivery.route]]\ndomains = [\"*\"]\nnexthop = \"smtp.provider.example\"\ntls = \"dane-only\"\n",
			`line 6: delivery.route[0].tls: "dane-only" needs TLSA lookups for smtp.provider.example, which dane.enabled = false turns off`},
		{"bad rate", route("rate = \"lots\"\n"), `line 4: delivery.route[0].rate: "lots" is not a rate`},
		{"negative connections", route("max_connections = -1\n"), "line 4: delivery.route[0].max_connections: must not be negative"},
		{"overlapping routes", route("") + "[[delivery.route]]\ndomains = [\"a.example\", \"*\"]\nnexthop = \"b.example\"\n",
			"line 5: delivery.route[1].domains: overlaps delivery.route[0] (line 2): both match domain * with the same specificity"},
		{"overlapping sender routes", route("senders = [\"@t.example\"]\n") + "[[delivery.route]]\ndomains = [\"*\"]\nsenders = [\"@T.example\"]\nnexthop = \"b.example\"\n",
			"delivery.route[1].domains: overlaps delivery.route[0] (line 2): both match domain * and sender @t.example"},
		{"limits without target", "[[delivery.limits]]\nmax_connections = 3\n", "delivery.limits[0].domains: set domains"},
		{"limits with both", "[[delivery.limits]]\ndomains = [\"a.example\"]\nmx_hosts = [\".b.example\"]\nmax_connections = 3\n", "line 2: delivery.limits[0].domains: set domains"},
		{"limits without limit", "[[delivery.limits]]\ndomains = [\"a.example\"]\n", "line 2: delivery.limits[0].domains: sets no limit"},
		{"limits bad rate", "[[delivery.limits]]\ndomains = [\"a.example\"]\nrate = \"600 per minute\"\n", `line 3: delivery.limits[0].rate: "600 per minute" is not a rate`},
		{"overlapping limits", "[[delivery.limits]]\nmx_hosts = [\".google.com\"]\nmax_connections = 3\n[[delivery.limits]]\ndomains = [\"a.example\"]\nmax_connections = 3\n[[delivery.limits]]\nmx_hosts = [\".GOOGLE.com\"]\nrate = \"1/s\"\n",
			"line 8: delivery.limits[2].mx_hosts: overlaps delivery.limits[0] (line 2)"},
		{"policy pattern", "[[delivery.policy]]\ndomains = [\"*.x\"]\ntls = \"may\"\n", `line 2: delivery.policy[0].domains: "*.x" is not a domain pattern`},
	} {
		t.Run(c.name, func(t *testing.T) {
			def := Default()
			def.Hostname = "relay.example.com"
			_, err := parse([]byte(c.toml), def)
			if err == nil {
				t.Fatalf("no error for\n%s", c.toml)
			}
			if !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("error %q\nis not one line containing %q", err, c.want)
			}
		})
	}
}

func TestPasswordFileProblemsStopTheLoad(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "empty.pass"), nil, 0o600)
	os.WriteFile(filepath.Join(dir, "two.pass"), []byte("a\nb\n"), 0o600)
	os.Mkdir(filepath.Join(dir, "adir"), 0o700) // unreadable as a file, even for root
	for file, want := range map[string]string{
		"missing.pass": "no such file or directory",
		"adir":         "is a directory",
		"empty.pass":   "is empty",
		"two.pass":     "more than one line",
	} {
		p := filepath.Join(dir, "c.toml")
		os.WriteFile(p, []byte("hostname = \"relay.example.com\"\n[[delivery.route]]\ndomains = [\"*\"]\nnexthop = \"a.example:587\"\nauth_username = \"u\"\nauth_password_file = \""+file+"\"\n"), 0o600)
		_, err := Load(p)
		prefix := "config " + p + ": line 6: delivery.route[0].auth_password_file: "
		if err == nil || !strings.HasPrefix(err.Error(), prefix) || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: err = %v, want %q…%q", file, err, prefix, want)
		}
	}
}

func TestDefaultsAreThePackagesDefaults(t *testing.T) {
	d := Default()
	q := queue.DefaultOptions
	var schedule []time.Duration
	for _, r := range d.Delivery.RetrySchedule {
		schedule = append(schedule, r.Duration)
	}
	for _, c := range []struct {
		key       string
		got, want any
	}{
		{"delivery.workers", d.Delivery.Workers, q.Workers},
		{"delivery.max_connections_per_domain (queue)", d.Delivery.MaxConnsPerDomain, q.MaxConnsPerDomain},
		{"delivery.max_connections_per_domain (delivery)", d.Delivery.MaxConnsPerDomain, delivery.DefaultMaxConnsPerDomain},
		{"delivery.retry_schedule", schedule, q.RetrySchedule},
		{"delivery.max_queue_time", d.Delivery.MaxQueueTime.Duration, q.MaxQueueTime},
		{"delivery.delay_notice_after", d.Delivery.DelayNoticeAfter.Duration, q.DelayNoticeAfter},
		{"delivery.bounce_size_limit", int64(d.Delivery.BounceSizeLimit), q.BounceSizeLimit},
		{"delivery.connect_timeout", d.Delivery.ConnectTimeout.Duration, delivery.DefaultConnectTimeout},
		{"submission.max_message_size", int64(d.Submission.MaxMessageSize), int64(smtpin.DefaultMaxMessageSize)},
		{"submission.max_recipients", d.Submission.MaxRecipients, smtpin.DefaultMaxRecipients},
		{"submission.max_hops", d.Submission.MaxHops, smtpin.DefaultMaxHops},
		{"submission.max_connections_per_ip", d.Submission.MaxConnsPerIP, smtpin.DefaultMaxConnsPerIP},
		{"submission.max_connections", d.Submission.MaxConns, smtpin.DefaultMaxConns},
		{"submission.command_timeout", d.Submission.CommandTimeout.Duration, smtpin.DefaultCommandTimeout},
		{"submission.data_timeout", d.Submission.DataTimeout.Duration, smtpin.DefaultDataTimeout},
		{"submission.auth_limit.failures", d.Submission.AuthRate.Failures, smtpin.DefaultAuthFailures},
		{"submission.auth_limit.failures_per_ip", d.Submission.AuthRate.FailuresPerIP, smtpin.DefaultAuthFailuresPerIP},
		{"submission.auth_limit.per", d.Submission.AuthRate.Per.Duration, smtpin.DefaultAuthFailuresPer},
		{"dns.timeout", d.DNS.Timeout.Duration, resolve.DefaultTimeout},
		{"sts.fetch_timeout", d.STS.FetchTimeout.Duration, sts.DefaultFetchTimeout},
	} {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("%s: configuration default %v, package default %v", c.key, c.got, c.want)
		}
	}
	// 0 means never in the configuration; the queue reads it the same way.
	if d, err := Parse([]byte("hostname = \"a.example\"\n[delivery]\ndelay_notice_after = \"0s\"\n")); err != nil || d.Delivery.DelayNoticeAfter.Duration != 0 {
		t.Errorf("delay_notice_after = 0s: %v, %v", d, err)
	}
}

func TestChangedNamesTheKeys(t *testing.T) {
	a, err := Parse([]byte("hostname = \"a.example\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := Parse([]byte("hostname = \"a.example\"\n[submission.auth_limit]\nfailures = 9\nfailures_per_ip = 30\n[delivery]\nretry_schedule = [\"1m\"]\n[[delivery.policy]]\ndomain = \"x.example\"\ntls = \"verify\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(Changed(a, b), " ")
	want := "submission.auth_limit.failures submission.auth_limit.failures_per_ip delivery.retry_schedule delivery.policy"
	if got != want {
		t.Errorf("Changed = %q, want %q", got, want)
	}
	if c := Changed(a, a); len(c) != 0 {
		t.Errorf("Changed(a, a) = %v", c)
	}
}

func TestHostnameFromSystemWhenLeftOut(t *testing.T) {
	if c, err := Parse([]byte("[log]\nlevel = \"info\"\n")); err == nil && !c.HostnameFromSystem {
		t.Error("hostname left out, but HostnameFromSystem is false")
	}
	if c, err := Parse([]byte("hostname = \"relay.example.com\"\n")); err != nil || c.HostnameFromSystem {
		t.Errorf("hostname set: %v, HostnameFromSystem %v", err, c.HostnameFromSystem)
	}
}

// With DANE off, a route's dane or dane-only is taken when a policy
// entry for its nexthop turns TLSA lookups on there.
func TestDANERouteWithDANEOffNeedsAPolicyEntry(t *testing.T) {
	def := Default()
	def.Hostname = "relay.example.com"
	toml := "[dane]\nenabled = false\n[[delivery.policy]]\ndomains = [\".provider.example\"]\ntls = \"dane\"\n" +
		"[[delivery.route]]\ndomains = [\"*\"]\nnexthop = \"smtp.provider.example\"\ntls = \"dane-only\"\n"
	if _, err := parse([]byte(toml), def); err != nil {
		t.Fatalf("refused: %v", err)
	}
}

// Several keys of one domain may sign its relayed mail (an RSA key beside
// an Ed25519 one); only a key named twice is refused.
func TestSeveralKeysOfOneDomainSignRelayedMail(t *testing.T) {
	def := Default()
	def.Hostname = "relay.example.com"
	two := "[[dkim]]\ndomain = \"example.com\"\nselector = \"rsa\"\nkey_file = \"a.pem\"\nsign_relayed = true\n" +
		"[[dkim]]\ndomain = \"example.com\"\nselector = \"ed\"\nkey_file = \"b.pem\"\nsign_relayed = true\n"
	if _, err := parse([]byte(two), def); err != nil {
		t.Fatalf("refused: %v", err)
	}
	twice := strings.ReplaceAll(two, `"ed"`, `"rsa"`)
	if _, err := parse([]byte(twice), Default()); err == nil || !strings.Contains(err.Error(), "defined twice") {
		t.Errorf("one key name twice: %v", err)
	}
}
