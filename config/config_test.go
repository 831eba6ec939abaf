package config

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
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
		{"submission.max_connections_per_ip", cfg.Submission.MaxConnsPerIP, def.Submission.MaxConnsPerIP},
	} {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("%s: example says %+v, default is %+v", c.name, c.got, c.want)
		}
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
allowed_senders = ["*@example.com", "bob@example.org"]
[[submission.users]]
name = "cron"
password_hash = "` + testHash + `"
[delivery]
retry_schedule = ["1m", "1h30m"]
ip_version = "6"
[[delivery.policy]]
domain = "Partner.Example."
tls = "verify"
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
	if u := cfg.Submission.Users; len(u) != 2 || u[0].AllowedSenders[1] != "bob@example.org" || u[1].Name != "cron" {
		t.Errorf("users = %+v", u)
	}
	if r := cfg.Delivery.RetrySchedule; len(r) != 2 || r[1].Duration != 90*time.Minute {
		t.Errorf("retry_schedule = %v", r)
	}
	if p := cfg.Delivery.Policies; len(p) != 1 || p[0].Domain != "partner.example" {
		t.Errorf("policy = %+v, want the domain lower-cased without the dot", p)
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
		{"wrong type", "[delivery]\nworkers = \"ten\"\n", "workers"},
		{"bad network", "[submission]\ntrusted_networks = [\"10.0.0.0/33\"]\n", `line 2: submission.trusted_networks: "10.0.0.0/33" is not an IP network`},
		{"bad level", "[log]\nlevel = \"loud\"\n", `line 2: log.level: "loud" is not a level`},
		{"bad format", "[log]\nformat = \"xml\"\n", "log.format"},
		{"bad hostname", "hostname = \"not a name\"\n", "line 1: hostname: \"not a name\" is not a host name"},
		{"no listener", "[submission]\nlisten = \"\"\n", "line 2: submission.listen: no listener"},
		{"bad listen", "[submission]\nlisten = \"localhost\"\n", `line 2: submission.listen: "localhost" is not host:port`},
		{"bad metrics listen", "[metrics]\nlisten = \"9100\"\n", "metrics.listen"},
		{"cert without key", "[submission]\ntls_cert = \"c.pem\"\n", "tls_cert and tls_key go together"},
		{"implicit TLS without cert", "[submission]\nlisten_tls = \":465\"\n", "line 2: submission.listen_tls: implicit TLS needs"},
		{"zero recipients", "[submission]\nmax_recipients = 0\n", "line 2: submission.max_recipients: must be positive"},
		{"negative conns", "[submission]\nmax_connections_per_ip = -1\n", "submission.max_connections_per_ip"},
		{"zero conns", "[submission]\nmax_connections_per_ip = 0\n", "line 2: submission.max_connections_per_ip: must be positive"},
		{"key in another case", "[delivery]\nworkers = 3\nWorkers = 5\n", "line 3: delivery.Workers: unknown key (keys are case-sensitive: delivery.workers)"},
		{"table in another case", "[Delivery]\nworkers = 3\n", "unknown key (keys are case-sensitive: delivery)"},
		{"zero total conns", "[submission]\nmax_connections = 0\n", "line 2: submission.max_connections: must be at least max_connections_per_ip (20), got 0"},
		{"total under per-IP", "[submission]\nmax_connections_per_ip = 50\nmax_connections = 40\n", "line 3: submission.max_connections: must be at least"},
		{"plaintext password", "[[submission.users]]\nname = \"a\"\npassword_hash = \"hunter2\"\n", "line 3: submission.users[0].password_hash: is not a bcrypt hash"},
		{"empty user name", "[[submission.users]]\nname = \"\"\npassword_hash = \"" + testHash + "\"\n", "submission.users[0].name: must not be empty"},
		{"duplicate user", "[[submission.users]]\nname = \"a\"\npassword_hash = \"" + testHash + "\"\n[[submission.users]]\nname = \"a\"\npassword_hash = \"" + testHash + "\"\n", "line 5: submission.users[1].name: user \"a\" is defined twice"},
		{"bad sender pattern", "[[submission.users]]\nname = \"a\"\npassword_hash = \"" + testHash + "\"\nallowed_senders = [\"example.com\"]\n", "line 4: submission.users[0].allowed_senders"},
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
		{"duplicate policy", "[[delivery.policy]]\ndomain = \"a.example\"\ntls = \"may\"\n[[delivery.policy]]\ndomain = \"A.example\"\ntls = \"none\"\n", "a.example has two policies"},
		{"zero fetch timeout", "[sts]\nfetch_timeout = \"0s\"\n", "sts.fetch_timeout"},
		{"tlsrpt without organization", "[tlsrpt]\nenabled = true\n", "tlsrpt.organization_name: must be set"},
		{"tlsrpt without contact", "[tlsrpt]\nenabled = true\norganization_name = \"Example\"\n", "tlsrpt.contact_info: must be set"},
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
	os.WriteFile(p, []byte("hostname = \"a.example\"\nstate_dir = \"state\"\n[submission]\ntls_cert = \"c.pem\"\ntls_key = \"/k.pem\"\n"), 0o600)
	cfg, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.StateDir != filepath.Join(dir, "state") || cfg.Submission.TLSCert != filepath.Join(dir, "c.pem") || cfg.Submission.TLSKey != "/k.pem" {
		t.Errorf("paths = %q %q %q", cfg.StateDir, cfg.Submission.TLSCert, cfg.Submission.TLSKey)
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
