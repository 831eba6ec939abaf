// Package config loads stsrelay's one TOML file: defaults, then the file,
// then validation. Every error names the key, its line and what is allowed
// (docs/DESIGN.md, "Configuration"). No other package reads the file. The
// defaults are the packages' own (queue.DefaultOptions, smtpin.Default…),
// so that a zero option and a missing key mean the same.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/stsrelay/stsrelay/admin"
	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/resolve"
	"github.com/stsrelay/stsrelay/routing"
	"github.com/stsrelay/stsrelay/smtpin"
	"github.com/stsrelay/stsrelay/sts"
)

// Config is the whole configuration, typed. Field comments give defaults;
// config.toml.example documents every key.
type Config struct {
	// Hostname is our name in EHLO, Received and DSNs; default: the
	// machine's host name.
	Hostname string `toml:"hostname"`
	// StateDir holds the database and the control socket; a relative path
	// is relative to the configuration file's folder. Default
	// /var/lib/stsrelay.
	StateDir string `toml:"state_dir"`

	Log        Log        `toml:"log"`
	Submission Submission `toml:"submission"`
	DNS        DNS        `toml:"dns"`
	Delivery   Delivery   `toml:"delivery"`
	STS        STS        `toml:"sts"`
	DANE       DANE       `toml:"dane"`
	TLSRPT     TLSRPT     `toml:"tlsrpt"`
	DKIM       []DKIM     `toml:"dkim"`
	Metrics    Metrics    `toml:"metrics"`

	// Path is the file this was loaded from.
	Path string `toml:"-"`
	// HostnameFromSystem is set when the file leaves hostname out and
	// the machine's host name is used.
	HostnameFromSystem bool `toml:"-"`
}

type Log struct {
	Level  string `toml:"level"`  // debug | info | warn | error
	Format string `toml:"format"` // text | json
}

type Submission struct {
	Listen          string     `toml:"listen"`     // plain SMTP, STARTTLS when a certificate is set
	ListenTLS       string     `toml:"listen_tls"` // implicit TLS (port 465 style)
	TLSCert         string     `toml:"tls_cert"`
	TLSKey          string     `toml:"tls_key"`
	TrustedNetworks []Network  `toml:"trusted_networks"`
	MaxMessageSize  Size       `toml:"max_message_size"`
	MaxRecipients   int        `toml:"max_recipients"`
	MaxHops         int        `toml:"max_hops"` // Received fields a message may carry; more is a mail loop
	MaxConnsPerIP   int        `toml:"max_connections_per_ip"`
	MaxConns        int        `toml:"max_connections"` // in all; trusted_networks are still let in
	CommandTimeout  Duration   `toml:"command_timeout"`
	DataTimeout     Duration   `toml:"data_timeout"`
	SessionTickets  bool       `toml:"tls_session_tickets"`
	ShowAuthUser    bool       `toml:"received_show_user"`
	Postmaster      string     `toml:"postmaster"` // where RCPT TO:<Postmaster> goes; "" = postmaster@hostname
	Users           []User     `toml:"users"`
	AuthRate        AuthLimits `toml:"auth_limit"`
}

// AuthLimits rate-limits failed AUTH attempts per client IP and user
// name, and per client IP over all names.
type AuthLimits struct {
	Failures      int      `toml:"failures"`        // allowed in a burst, per client and user name
	FailuresPerIP int      `toml:"failures_per_ip"` // allowed in a burst, per client over all names
	Per           Duration `toml:"per"`             // one failure is forgiven per this long
}

type User struct {
	Name           string   `toml:"name"`
	PasswordHash   string   `toml:"password_hash"` // bcrypt, from `stsrelay hash-password`
	AllowedSenders []string `toml:"allowed_senders"`
}

type DNS struct {
	Resolver string   `toml:"resolver"` // host:port; "" = /etc/resolv.conf
	Timeout  Duration `toml:"timeout"`
}

type Delivery struct {
	Workers           int        `toml:"workers"`
	MaxConnsPerDomain int        `toml:"max_connections_per_domain"`
	RetrySchedule     []Duration `toml:"retry_schedule"`
	MaxQueueTime      Duration   `toml:"max_queue_time"`
	DelayNoticeAfter  Duration   `toml:"delay_notice_after"`
	BounceSizeLimit   Size       `toml:"bounce_size_limit"`
	ConnectTimeout    Duration   `toml:"connect_timeout"`
	IPVersion         string     `toml:"ip_version"` // both | 4 | 6
	Chunking          bool       `toml:"chunking"`   // BDAT (RFC 3030) where offered; false: DATA always
	Policies          []Policy   `toml:"policy"`
	Routes            []Route    `toml:"route"`
	Limits            []Limits   `toml:"limits"`
}

// Policy is a local TLS policy for destination domains, like an entry of
// Postfix's smtp_tls_policy_maps. Domains are patterns as routes write
// them (routing.ParsePattern); Domain is the one-pattern form.
type Policy struct {
	Domain  string   `toml:"domain"`
	Domains []string `toml:"domains"`
	TLS     string   `toml:"tls"` // may | encrypt | verify | dane | dane-only | none
}

// Route sends mail for some recipient domains (and optionally some
// senders) to a next hop of the operator's choosing, like Postfix's
// transport and sender_dependent_relayhost maps.
type Route struct {
	Domains     []string `toml:"domains"` // "example.org", ".example.org", "*"
	Senders     []string `toml:"senders"` // "user@example.org", "@example.org", "<>"; none: any
	Nexthop     string   `toml:"nexthop"` // "[host]:port", "name:port", "name"
	ImplicitTLS bool     `toml:"implicit_tls"`
	// TLS is may | encrypt | verify | dane | dane-only | none; "" means
	// verify with credentials, else what DNS policy says.
	TLS              string `toml:"tls"`
	AuthUsername     string `toml:"auth_username"`
	AuthPasswordFile string `toml:"auth_password_file"`
	Shaping
	// AuthPassword is the first line of AuthPasswordFile, read by Load.
	AuthPassword Secret `toml:"-"`
}

// Limits shape the traffic to some destinations: recipient Domains (each
// domain counted on its own) or MXHosts (every matching host counted
// together, as one provider).
type Limits struct {
	Domains []string `toml:"domains"`
	MXHosts []string `toml:"mx_hosts"`
	Shaping
}

// Shaping is what a route or a [[delivery.limits]] entry may limit; zero
// fields keep the defaults.
type Shaping struct {
	MaxConnections     int  `toml:"max_connections"`             // default: max_connections_per_domain
	MaxMessagesPerConn int  `toml:"max_messages_per_connection"` // mail transactions; default: no limit
	Rate               Rate `toml:"rate"`                        // "600/m"; default: no limit
}

// Secret is a password read from a file. It prints as "[redacted]", so
// that no log line, %v or JSON dump of the configuration shows it.
type Secret struct{ s string }

// Reveal returns the password, for the one place that sends it.
func (s Secret) Reveal() string { return s.s }

func (s Secret) String() string               { return "[redacted]" }
func (s Secret) GoString() string             { return "[redacted]" }
func (s Secret) MarshalText() ([]byte, error) { return []byte("[redacted]"), nil }

type STS struct {
	Enabled          bool     `toml:"enabled"`
	MatchCNAMETarget bool     `toml:"match_cname_target"`
	FetchTimeout     Duration `toml:"fetch_timeout"`
}

type DANE struct {
	Enabled bool `toml:"enabled"`
	// TrustRemoteResolver silences the start-up warning that DNSSEC
	// status (the AD bit) comes from a resolver not on this host.
	TrustRemoteResolver bool `toml:"trust_remote_resolver"`
}

type TLSRPT struct {
	Enabled          bool   `toml:"enabled"`
	OrganizationName string `toml:"organization_name"`
	ContactInfo      string `toml:"contact_info"` // an email address; its domain is the report submitter
	ReportSender     string `toml:"report_sender"`
	// MaxDelay bounds the random wait after 00:00 UTC before the day's
	// reports go out (RFC 8460 §4.1).
	MaxDelay Duration `toml:"max_delay"`
}

// DKIM is one signing key, published at Selector._domainkey.Domain.
type DKIM struct {
	Domain   string `toml:"domain"`
	Selector string `toml:"selector"`
	KeyFile  string `toml:"key_file"` // PEM: RSA (PKCS #1 or #8) or Ed25519 (PKCS #8)
	// SignRelayed also signs relayed mail whose From: domain is Domain
	// or a subdomain of it (the closest such key wins); default false.
	SignRelayed bool `toml:"sign_relayed"`
}

type Metrics struct {
	Listen string `toml:"listen"` // host:port for /metrics and /healthz; "" = off
	// Pprof also serves Go's profiles under /debug/pprof/ on Listen, for
	// benchmarks and diagnosis.
	Pprof bool `toml:"pprof"`
}

// PolicyTLS lists the values [[delivery.policy]] tls accepts.
var PolicyTLS = []string{"may", "encrypt", "verify", "dane", "dane-only", "none"}

// RouteTLS lists the values [[delivery.route]] tls accepts: "dane" is
// Postfix's opportunistic DANE (what DNS publishes decides).
var RouteTLS = []string{"may", "encrypt", "verify", "dane", "dane-only", "none"}

// maxPasswordFile bounds what Load reads of a password file.
const maxPasswordFile = 4 << 10

// Default returns the configuration used for every key the file leaves
// out. The values are the packages' defaults: one table, in the packages.
func Default() *Config {
	host, _ := os.Hostname()
	q := queue.DefaultOptions
	var schedule []Duration
	for _, d := range q.RetrySchedule {
		schedule = append(schedule, Duration{d})
	}
	return &Config{
		Hostname: host,
		StateDir: "/var/lib/stsrelay",
		Log:      Log{Level: "info", Format: "text"},
		Submission: Submission{
			Listen:         "127.0.0.1:587",
			MaxMessageSize: smtpin.DefaultMaxMessageSize,
			MaxRecipients:  smtpin.DefaultMaxRecipients,
			MaxHops:        smtpin.DefaultMaxHops,
			MaxConnsPerIP:  smtpin.DefaultMaxConnsPerIP,
			MaxConns:       smtpin.DefaultMaxConns,
			CommandTimeout: Duration{smtpin.DefaultCommandTimeout},
			DataTimeout:    Duration{smtpin.DefaultDataTimeout},
			AuthRate: AuthLimits{
				Failures:      smtpin.DefaultAuthFailures,
				FailuresPerIP: smtpin.DefaultAuthFailuresPerIP,
				Per:           Duration{smtpin.DefaultAuthFailuresPer},
			},
		},
		DNS: DNS{Timeout: Duration{resolve.DefaultTimeout}},
		Delivery: Delivery{
			Workers:           q.Workers,
			MaxConnsPerDomain: q.MaxConnsPerDomain,
			RetrySchedule:     schedule,
			MaxQueueTime:      Duration{q.MaxQueueTime},
			DelayNoticeAfter:  Duration{q.DelayNoticeAfter},
			BounceSizeLimit:   Size(q.BounceSizeLimit),
			ConnectTimeout:    Duration{delivery.DefaultConnectTimeout},
			IPVersion:         "both",
			Chunking:          true,
		},
		STS:    STS{Enabled: true, FetchTimeout: Duration{sts.DefaultFetchTimeout}},
		DANE:   DANE{Enabled: true},
		TLSRPT: TLSRPT{MaxDelay: Duration{4 * time.Hour}},
	}
}

// Load reads, defaults and validates the file at path.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("config %s: no such file (start from config.toml.example)", path)
		}
		return nil, fmt.Errorf("config %s: %w", path, errors.Unwrap(err))
	}
	cfg, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	cfg.Path = path
	// Relative paths are relative to the file's folder, made absolute so
	// that logs and the CLI name the same place whatever the working folder.
	dir, err := filepath.Abs(filepath.Dir(path))
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	paths := []*string{&cfg.StateDir, &cfg.Submission.TLSCert, &cfg.Submission.TLSKey}
	for i := range cfg.Delivery.Routes {
		paths = append(paths, &cfg.Delivery.Routes[i].AuthPasswordFile)
	}
	for i := range cfg.DKIM {
		paths = append(paths, &cfg.DKIM[i].KeyFile)
	}
	for _, f := range paths {
		if *f != "" && !filepath.IsAbs(*f) {
			*f = filepath.Join(dir, *f)
		}
	}
	// bind(2) refuses a unix socket path that does not fit sun_path with
	// its NUL (108 bytes on Linux, 104 on the BSDs) with a bare EINVAL.
	sock := filepath.Join(cfg.StateDir, admin.SocketName)
	if limit := len(syscall.RawSockaddrUnix{}.Path) - 1; len(sock) > limit {
		return nil, fmt.Errorf("config %s: %w", path, keyError(data, "state_dir", fmt.Sprintf(
			"the control socket %s would be %d bytes, too long for a unix socket (at most %d); choose a shorter path", sock, len(sock), limit)))
	}
	if err := cfg.readPasswords(data); err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// readPasswords reads each route's password file: its first line, without
// the line end. A missing, unreadable or empty file is an error now, not a
// deferral of every message later.
func (c *Config) readPasswords(data []byte) error {
	for i := range c.Delivery.Routes {
		r := &c.Delivery.Routes[i]
		if r.AuthPasswordFile == "" {
			continue
		}
		key := fmt.Sprintf("delivery.route[%d].auth_password_file", i)
		pw, err := readPassword(r.AuthPasswordFile)
		if err != nil {
			return keyError(data, key, err.Error())
		}
		r.AuthPassword = Secret{pw}
	}
	return nil
}

func readPassword(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("cannot read %s: %v", path, errors.Unwrap(err))
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxPasswordFile+1))
	if err != nil {
		return "", fmt.Errorf("cannot read %s: %v", path, errors.Unwrap(err))
	}
	if len(b) > maxPasswordFile {
		return "", fmt.Errorf("%s is over %d bytes; it must hold the password alone", path, maxPasswordFile)
	}
	pw, rest, _ := strings.Cut(string(b), "\n")
	pw = strings.TrimSuffix(pw, "\r")
	if strings.TrimSpace(rest) != "" {
		return "", fmt.Errorf("%s has more than one line; it must hold the password alone", path)
	}
	if pw == "" {
		return "", fmt.Errorf("%s is empty", path)
	}
	return pw, nil
}

// Parse decodes and validates TOML text; relative paths stay as written.
func Parse(data []byte) (*Config, error) {
	return parse(data, Default())
}

// parse decodes data over cfg, which holds the defaults.
func parse(data []byte, cfg *Config) (*Config, error) {
	md, err := toml.Decode(string(data), cfg)
	if err != nil {
		return nil, decodeError(data, err)
	}
	if undecoded := md.Undecoded(); len(undecoded) > 0 {
		k := undecoded[0].String()
		what := "unknown key"
		if headerLine(data, k) > 0 {
			what = "unknown table"
		}
		return nil, keyError(data, k, what+" (see config.toml.example for the keys there are)")
	}
	cfg.HostnameFromSystem = !md.IsDefined("hostname")
	// The TOML library matches keys to fields without regard to case, so
	// "Workers" and "workers" would both set one field, the last decoded
	// winning at random. Keys are spelled as documented, or refused.
	for _, k := range md.Keys() {
		if want, ok := spelling(reflect.TypeFor[Config](), k); !ok {
			key := k.String()
			if line := arrayKeyLine(data, key); line > 0 {
				// A key of an [[array]] table: named with its index.
				return nil, fmt.Errorf("line %d: %s: unknown key (keys are case-sensitive: %s)",
					line, indexedKey(data, line, key), indexedKey(data, line, want))
			}
			return nil, keyError(data, key, fmt.Sprintf("unknown key (keys are case-sensitive: %s)", want))
		}
	}
	if err := cfg.validate(data); err != nil {
		return nil, err
	}
	return cfg, nil
}

// typeMismatch is the TOML library's error for a value of the wrong type.
var typeMismatch = regexp.MustCompile(`^toml: line (\d+) \(last key "([^"]+)"\): incompatible types: TOML value has type (\S+); destination has type (\S+)$`)

// spelling checks that every part of key names a field by its exact toml
// tag; when one does not, it returns the documented spelling.
func spelling(t reflect.Type, key toml.Key) (string, bool) {
	for i, part := range key {
		for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice {
			t = t.Elem()
		}
		if t.Kind() != reflect.Struct {
			return "", true // a value's own structure, such as an inline table
		}
		found := false
		// Visible fields: an embedded struct's (Shaping in a route) are
		// keys of the table too.
		for _, f := range reflect.VisibleFields(t) {
			tag, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
			if tag == part {
				t, found = f.Type, true
				break
			}
			if strings.EqualFold(tag, part) {
				return strings.Join(append(append([]string(nil), key[:i]...), tag), "."), false
			}
		}
		if !found {
			return "", true // unknown keys are reported by Undecoded
		}
	}
	return "", true
}

// decodeError turns the TOML library's error into our one-line form.
func decodeError(data []byte, err error) error {
	var pe toml.ParseError
	if !errors.As(err, &pe) {
		if m := typeMismatch.FindStringSubmatch(err.Error()); m != nil {
			return fmt.Errorf("line %s: %s: is %s, want %s", m[1], m[2], tomlType(m[3]), goType(m[4]))
		}
		return errors.New(oneLine(strings.TrimPrefix(err.Error(), "toml: ")))
	}
	// The library's line can be the next one when the error is at a line
	// end, and its last key the table before: count from the byte offset,
	// and name the key only when it is on that line.
	line := pe.Position.Line
	if off := pe.Position.Start; off > 0 && off <= len(data) {
		line = 1 + bytes.Count(data[:off], []byte("\n"))
	}
	if k := pe.LastKey; k != "" {
		leaf := k[strings.LastIndex(k, ".")+1:]
		if text := lineText(data, line); keyIs(strings.TrimSpace(text), leaf) {
			return fmt.Errorf("line %d: %s: %s", line, indexedKey(data, line, oneLine(k)), oneLine(pe.Message))
		}
	}
	return fmt.Errorf("line %d: %s", line, oneLine(pe.Message))
}

// tomlType names a TOML value's type as the library reports it.
func tomlType(t string) string {
	switch t {
	case "string":
		return "a string"
	case "int64":
		return "a number"
	case "float64":
		return "a decimal number"
	case "bool":
		return "true or false"
	case "[]interface", "[]interface{}", "[]any":
		return "a list"
	case "map[string]interface", "map[string]interface{}", "map[string]any":
		return "a table"
	}
	if strings.HasPrefix(t, "time.") {
		return "a date or time"
	}
	return "a " + t
}

// goType says what a destination type wants, as the library reports it.
func goType(t string) string {
	switch t {
	case "integer":
		return "a whole number (no quotes)"
	case "string":
		return "a string in quotes"
	case "bool":
		return "true or false"
	case "float":
		return "a number"
	case "slice", "array":
		return `a list in brackets, e.g. ["…", "…"]`
	case "struct", "map":
		return "a table"
	}
	return "a " + t
}

// lineText returns line n (1-based) of data.
func lineText(data []byte, n int) string {
	lines := strings.Split(string(data), "\n")
	if n < 1 || n > len(lines) {
		return ""
	}
	return lines[n-1]
}

// headerLine finds a [table] or [[array]] header named name.
func headerLine(data []byte, name string) int {
	for n, line := range strings.Split(string(data), "\n") {
		t := strings.TrimSpace(line)
		if !strings.HasPrefix(t, "[") {
			continue
		}
		end := strings.IndexByte(t, ']')
		if end < 0 {
			continue
		}
		h := strings.TrimSpace(strings.Trim(t[:end], "[ "))
		if strings.ReplaceAll(h, " ", "") == name {
			return n + 1
		}
	}
	return 0
}

// arrayKeyLine returns the line where key ("delivery.route.rate") is set
// in an [[array]] table of its name, or 0.
func arrayKeyLine(data []byte, key string) int {
	i := strings.LastIndex(key, ".")
	if i < 0 {
		return 0
	}
	table, leaf := key[:i], key[i+1:]
	current := ""
	for n, l := range strings.Split(string(data), "\n") {
		t := strings.TrimSpace(l)
		switch {
		case strings.HasPrefix(t, "[["):
			current = strings.TrimSpace(strings.Trim(t[:strings.Index(t+"]]", "]]")], "[ "))
		case strings.HasPrefix(t, "["):
			current = ""
		case current == table && keyIs(t, leaf):
			return n + 1
		}
	}
	return 0
}

// indexedKey adds the index of the [[array]] table that line is in to key:
// "delivery.route.rate" → "delivery.route[1].rate", as validation names it.
func indexedKey(data []byte, line int, key string) string {
	header, index := "", -1
	seen := map[string]int{}
	for n, l := range strings.Split(string(data), "\n") {
		if n+1 > line {
			break
		}
		t := strings.TrimSpace(l)
		switch {
		case strings.HasPrefix(t, "[["):
			header = strings.TrimSpace(strings.Trim(t[:strings.Index(t+"]]", "]]")], "[ "))
			index = seen[header]
			seen[header]++
		case strings.HasPrefix(t, "["):
			header = ""
		}
	}
	if rest, ok := strings.CutPrefix(key, header+"."); ok && header != "" {
		return fmt.Sprintf("%s[%d].%s", header, index, rest)
	}
	return key
}

// oneLine escapes the control characters that the TOML library copies
// from the file into its messages (a backslash before a line break, for
// one), so that an error stays one line.
func oneLine(s string) string {
	var b strings.Builder
	for _, r := range s {
		if r < 0x20 || r == 0x7f {
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// keyError names key and, when it can be found, its line.
func keyError(data []byte, key, msg string) error {
	line := headerLine(data, key)
	if line == 0 {
		line = lineOf(data, key)
	}
	if line > 0 {
		return fmt.Errorf("line %d: %s: %s", line, key, msg)
	}
	return fmt.Errorf("%s: %s", key, msg)
}

func (c *Config) validate(data []byte) error {
	bad := func(key, format string, args ...any) error {
		return keyError(data, key, fmt.Sprintf(format, args...))
	}
	if c.Hostname == "" {
		return bad("hostname", "must be set (this machine has no host name)")
	}
	if !routing.IsDomain(c.Hostname) {
		return bad("hostname", "%q is not a host name (use e.g. relay.example.com)", c.Hostname)
	}
	if c.StateDir == "" {
		return bad("state_dir", "must not be empty")
	}
	if !slices.Contains([]string{"debug", "info", "warn", "error"}, c.Log.Level) {
		return bad("log.level", "%q is not a level (use debug, info, warn or error)", c.Log.Level)
	}
	if !slices.Contains([]string{"text", "json"}, c.Log.Format) {
		return bad("log.format", "%q is not a format (use text or json)", c.Log.Format)
	}

	s := &c.Submission
	if s.Listen == "" && s.ListenTLS == "" {
		return bad("submission.listen", "no listener: set listen, listen_tls or both")
	}
	for _, l := range []struct{ key, addr string }{
		{"submission.listen", s.Listen}, {"submission.listen_tls", s.ListenTLS}, {"metrics.listen", c.Metrics.Listen},
	} {
		if l.addr == "" {
			continue
		}
		if _, port, err := net.SplitHostPort(l.addr); err != nil || !isPort(port) {
			return bad(l.key, "%q is not host:port (use e.g. 127.0.0.1:587 or :587)", l.addr)
		}
	}
	if c.Metrics.Pprof && c.Metrics.Listen == "" {
		return bad("metrics.pprof", "needs metrics.listen, the listener it is served on")
	}
	if (s.TLSCert == "") != (s.TLSKey == "") {
		return bad("submission.tls_cert", "tls_cert and tls_key go together: set both or neither")
	}
	if s.ListenTLS != "" && s.TLSCert == "" {
		return bad("submission.listen_tls", "implicit TLS needs submission.tls_cert and submission.tls_key")
	}
	if s.MaxMessageSize <= 0 {
		return bad("submission.max_message_size", "must be positive (use e.g. 35MB)")
	}
	if s.MaxRecipients <= 0 {
		return bad("submission.max_recipients", "must be positive, got %d", s.MaxRecipients)
	}
	if s.MaxHops <= 0 {
		return bad("submission.max_hops", "must be positive, got %d (RFC 5321 §6.3 suggests at least 100)", s.MaxHops)
	}
	if s.MaxConnsPerIP <= 0 {
		return bad("submission.max_connections_per_ip", "must be positive, got %d (trusted_networks are not limited)", s.MaxConnsPerIP)
	}
	if s.MaxConns < s.MaxConnsPerIP {
		return bad("submission.max_connections", "must be at least max_connections_per_ip (%d), got %d", s.MaxConnsPerIP, s.MaxConns)
	}
	if s.CommandTimeout.Duration <= 0 {
		return bad("submission.command_timeout", "must be positive (use e.g. 5m)")
	}
	if s.DataTimeout.Duration <= 0 {
		return bad("submission.data_timeout", "must be positive (use e.g. 10m)")
	}
	if s.AuthRate.Failures <= 0 {
		return bad("submission.auth_limit.failures", "must be positive, got %d", s.AuthRate.Failures)
	}
	if s.AuthRate.FailuresPerIP < s.AuthRate.Failures {
		return bad("submission.auth_limit.failures_per_ip", "must be at least failures (%d), got %d", s.AuthRate.Failures, s.AuthRate.FailuresPerIP)
	}
	if s.AuthRate.Per.Duration <= 0 {
		return bad("submission.auth_limit.per", "must be positive (use e.g. 1m)")
	}
	seen := map[string]bool{}
	if local, _, _ := strings.Cut(s.Postmaster, "@"); s.Postmaster != "" &&
		(!validSenderPattern(s.Postmaster) || strings.Contains(s.Postmaster, "*") || !isASCII(local)) {
		// The domain may be in U-labels, the local part not: every client
		// must reach it, SMTPUTF8 or not.
		return bad("submission.postmaster", "%q is not an address with an ASCII local part (use e.g. ops@example.com)", s.Postmaster)
	}
	for i, u := range s.Users {
		key := fmt.Sprintf("submission.users[%d]", i)
		if u.Name == "" {
			return bad(key+".name", "must not be empty")
		}
		if seen[u.Name] {
			return bad(key+".name", "user %q is defined twice", u.Name)
		}
		seen[u.Name] = true
		if !isBcrypt(u.PasswordHash) {
			return bad(key+".password_hash", "is not a bcrypt hash (make one with `stsrelay hash-password`; plaintext passwords are not accepted)")
		}
		for _, p := range u.AllowedSenders {
			if !validSenderPattern(p) {
				return bad(key+".allowed_senders", "%q is not a sender pattern (use user@example.com, *@example.com or *)", p)
			}
		}
	}

	if c.DNS.Resolver != "" {
		if _, port, err := net.SplitHostPort(c.DNS.Resolver); err != nil || !isPort(port) {
			return bad("dns.resolver", "%q is not host:port (use e.g. 127.0.0.1:53, or leave empty for /etc/resolv.conf)", c.DNS.Resolver)
		}
	}
	if c.DNS.Timeout.Duration <= 0 {
		return bad("dns.timeout", "must be positive (use e.g. 5s)")
	}

	d := &c.Delivery
	if d.Workers <= 0 {
		return bad("delivery.workers", "must be positive, got %d", d.Workers)
	}
	if d.MaxConnsPerDomain <= 0 {
		return bad("delivery.max_connections_per_domain", "must be positive, got %d", d.MaxConnsPerDomain)
	}
	if len(d.RetrySchedule) == 0 {
		return bad("delivery.retry_schedule", "needs at least one interval (use e.g. [\"5m\", \"30m\", \"1h\", \"4h\"])")
	}
	for _, r := range d.RetrySchedule {
		if r.Duration <= 0 {
			return bad("delivery.retry_schedule", "intervals must be positive, got %s", r)
		}
	}
	if d.MaxQueueTime.Duration <= 0 {
		return bad("delivery.max_queue_time", "must be positive (RFC 5321 §4.5.4.1 suggests 4-5 days: 120h)")
	}
	if d.DelayNoticeAfter.Duration < 0 {
		return bad("delivery.delay_notice_after", "must be 0 (never) or positive")
	}
	if d.BounceSizeLimit <= 0 {
		return bad("delivery.bounce_size_limit", "must be positive (use e.g. 10MB)")
	}
	if d.ConnectTimeout.Duration <= 0 {
		return bad("delivery.connect_timeout", "must be positive (use e.g. 30s)")
	}
	if !slices.Contains([]string{"both", "4", "6"}, d.IPVersion) {
		return bad("delivery.ip_version", "%q is not allowed (use both, 4 or 6)", d.IPVersion)
	}
	if err := c.validateTables(data); err != nil {
		return err
	}

	if c.STS.FetchTimeout.Duration <= 0 {
		return bad("sts.fetch_timeout", "must be positive (use e.g. 1m)")
	}
	if c.STS.FetchTimeout.Duration > sts.MaxFetchTimeout {
		return bad("sts.fetch_timeout", "%s is too long: at most %s (RFC 8461 §3.3 suggests 1m)", c.STS.FetchTimeout.Duration, sts.MaxFetchTimeout)
	}
	if c.TLSRPT.Enabled {
		if c.TLSRPT.OrganizationName == "" {
			return bad("tlsrpt.organization_name", "must be set when tlsrpt.enabled is true")
		}
		if c.TLSRPT.ContactInfo == "" {
			return bad("tlsrpt.contact_info", "must be set when tlsrpt.enabled is true")
		}
		if !isMailbox(c.TLSRPT.ContactInfo) {
			return bad("tlsrpt.contact_info", "%q is not an email address (use e.g. tlsrpt@example.com; its domain names the report submitter)", c.TLSRPT.ContactInfo)
		}
		if c.TLSRPT.ReportSender != "" && !isMailbox(c.TLSRPT.ReportSender) {
			return bad("tlsrpt.report_sender", "%q is not an email address (use e.g. tlsrpt-noreply@example.com)", c.TLSRPT.ReportSender)
		}
	}
	if d := c.TLSRPT.MaxDelay.Duration; d <= 0 || d > 20*time.Hour {
		return bad("tlsrpt.max_delay", "must be positive and at most 20h (use e.g. 4h)")
	}
	keys := map[string]bool{}
	for i, k := range c.DKIM {
		key := fmt.Sprintf("dkim[%d]", i)
		k.Domain = strings.ToLower(strings.TrimSuffix(k.Domain, "."))
		c.DKIM[i].Domain = k.Domain
		if !routing.IsDomain(k.Domain) || !strings.Contains(k.Domain, ".") {
			return bad(key+".domain", "%q is not a domain name", k.Domain)
		}
		if !routing.IsDomain(k.Selector) {
			return bad(key+".selector", "%q is not a DKIM selector (letters, digits, hyphens, dots)", k.Selector)
		}
		if k.KeyFile == "" {
			return bad(key+".key_file", "must be set (a PEM private key)")
		}
		if keys[k.Selector+"._domainkey."+k.Domain] {
			return bad(key+".selector", "%s._domainkey.%s is defined twice", k.Selector, k.Domain)
		}
		keys[k.Selector+"._domainkey."+k.Domain] = true
	}
	return nil
}

// validateTables checks [[delivery.policy]], [[delivery.route]] and
// [[delivery.limits]]: their patterns, and that no two entries of one
// table tie for some destination.
func (c *Config) validateTables(data []byte) error {
	bad := func(key, format string, args ...any) error {
		return keyError(data, key, fmt.Sprintf(format, args...))
	}
	d := &c.Delivery
	var policies []routing.Entry[int]
	policyField := make([]string, len(d.Policies))
	for i := range d.Policies {
		p := &d.Policies[i]
		key := fmt.Sprintf("delivery.policy[%d]", i)
		// "domain" is the one-pattern form that older files use.
		policyField[i] = "domains"
		if p.Domain != "" && len(p.Domains) == 0 {
			policyField[i] = "domain"
		}
		if p.Domain != "" {
			p.Domains = append([]string{p.Domain}, p.Domains...)
			p.Domain = ""
		}
		dk := key + "." + policyField[i]
		if len(p.Domains) == 0 {
			return bad(key+".domains", "must list at least one domain (example.org, .example.org or *)")
		}
		pats, err := parsePatterns(p.Domains)
		if err != nil {
			return bad(dk, "%v", err)
		}
		if !slices.Contains(PolicyTLS, p.TLS) {
			return bad(key+".tls", "%q is not a TLS policy (use %s)", p.TLS, strings.Join(PolicyTLS, ", "))
		}
		policies = append(policies, routing.Entry[int]{Domains: pats, Value: i})
	}
	if err := tieError(data, "delivery.policy", func(i int) string { return policyField[i] }, policies); err != nil {
		return err
	}
	// With DANE off, TLSA records are looked up only where a policy entry
	// says dane or dane-only (the daemon's DANE scope, matched as delivery
	// matches the entries).
	policyTable, err := routing.NewTable(policies)
	if err != nil {
		return bad("delivery.policy", "%v", err)
	}
	daneFor := func(host string) bool {
		if c.DANE.Enabled {
			return true
		}
		i, _, ok := policyTable.Lookup(host, "")
		return ok && (d.Policies[i].TLS == "dane" || d.Policies[i].TLS == "dane-only")
	}

	var routes []routing.Entry[int]
	for i := range d.Routes {
		r := &d.Routes[i]
		key := fmt.Sprintf("delivery.route[%d]", i)
		if len(r.Domains) == 0 {
			return bad(key+".domains", "must list at least one domain (example.org, .example.org or *)")
		}
		pats, err := parsePatterns(r.Domains)
		if err != nil {
			return bad(key+".domains", "%v", err)
		}
		var senders []routing.SenderPattern
		for _, s := range r.Senders {
			sp, err := routing.ParseSender(s)
			if err != nil {
				return bad(key+".senders", "%v", err)
			}
			senders = append(senders, sp)
		}
		if r.Nexthop == "" {
			return bad(key+".nexthop", "must be set (use [host]:port, name:port or name)")
		}
		hop, err := routing.ParseNexthop(r.Nexthop)
		if err != nil {
			return bad(key+".nexthop", "%v", err)
		}
		if r.TLS != "" && !slices.Contains(RouteTLS, r.TLS) {
			return bad(key+".tls", "%q is not a TLS level (use %s)", r.TLS, strings.Join(RouteTLS, ", "))
		}
		if r.TLS == "dane-only" && hop.Addr.IsValid() {
			// RFC 7672 §2.2: TLSA records hang off a host name; an
			// address has none, so every message would wait to expire.
			return bad(key+".tls", `"dane-only" needs a host name nexthop: an address has no TLSA records`)
		}
		if (r.TLS == "dane-only" || r.TLS == "dane") && !hop.Addr.IsValid() && !daneFor(hop.Host) {
			// No TLSA lookup for the nexthop: dane-only would wait for
			// records nobody looks up until every message expired.
			return bad(key+".tls", `%q needs TLSA lookups for %s, which dane.enabled = false turns off: enable DANE, or add a [[delivery.policy]] entry for %s with tls = "dane"`,
				r.TLS, hop.Host, hop.Host)
		}
		if (r.AuthUsername == "") != (r.AuthPasswordFile == "") {
			return bad(key+".auth_username", "auth_username and auth_password_file go together (the password is never written in this file)")
		}
		if r.AuthUsername != "" && r.TLS == "none" {
			return bad(key+".tls", `"none" with credentials would send the password in the clear; use encrypt or verify`)
		}
		if r.ImplicitTLS && r.TLS == "none" {
			return bad(key+".tls", `"none" contradicts implicit_tls = true`)
		}
		if err := checkShaping(data, key, r.Shaping); err != nil {
			return err
		}
		routes = append(routes, routing.Entry[int]{Domains: pats, Senders: senders})
	}
	if err := tieError(data, "delivery.route", func(int) string { return "domains" }, routes); err != nil {
		return err
	}

	var byDomain, byMX []routing.Entry[int]
	var domainIdx, mxIdx []int
	for i := range d.Limits {
		l := &d.Limits[i]
		key := fmt.Sprintf("delivery.limits[%d]", i)
		if (len(l.Domains) == 0) == (len(l.MXHosts) == 0) {
			return bad(key+".domains", "set domains (each domain limited on its own) or mx_hosts (matching hosts limited together), not both or neither")
		}
		field, list := "domains", l.Domains
		if len(l.MXHosts) > 0 {
			field, list = "mx_hosts", l.MXHosts
		}
		pats, err := parsePatterns(list)
		if err != nil {
			return bad(key+"."+field, "%v", err)
		}
		if l.Shaping == (Shaping{}) {
			return bad(key+"."+field, "sets no limit (use max_connections, max_messages_per_connection or rate)")
		}
		if err := checkShaping(data, key, l.Shaping); err != nil {
			return err
		}
		if field == "domains" {
			byDomain, domainIdx = append(byDomain, routing.Entry[int]{Domains: pats}), append(domainIdx, i)
		} else {
			byMX, mxIdx = append(byMX, routing.Entry[int]{Domains: pats}), append(mxIdx, i)
		}
	}
	for _, t := range []struct {
		field   string
		entries []routing.Entry[int]
		idx     []int
	}{{"domains", byDomain, domainIdx}, {"mx_hosts", byMX, mxIdx}} {
		if _, err := routing.NewTable(t.entries); err != nil {
			var ce *routing.ConflictError
			if errors.As(err, &ce) {
				ce.First, ce.Second = t.idx[ce.First], t.idx[ce.Second]
				return tieError(data, "delivery.limits", func(int) string { return t.field }, nil, ce)
			}
			return err
		}
	}
	return nil
}

// tieError reports two entries of table that tie, naming the later one's
// key and line and the earlier one's line.
func tieError(data []byte, table string, field func(int) string, entries []routing.Entry[int], known ...*routing.ConflictError) error {
	var ce *routing.ConflictError
	if len(known) > 0 {
		ce = known[0]
	} else if _, err := routing.NewTable(entries); err != nil {
		if !errors.As(err, &ce) {
			return err
		}
	} else {
		return nil
	}
	first := fmt.Sprintf("%s[%d]", table, ce.First)
	if line := lineOf(data, first+"."+field(ce.First)); line > 0 {
		first = fmt.Sprintf("%s (line %d)", first, line)
	}
	what := "domain " + ce.Domain
	if ce.Sender != "" {
		what += " and sender " + ce.Sender
	}
	return keyError(data, fmt.Sprintf("%s[%d].%s", table, ce.Second, field(ce.Second)),
		fmt.Sprintf("overlaps %s: both match %s with the same specificity, so neither would win", first, what))
}

// parsePatterns parses list and rewrites it in canonical form (lower
// case, no trailing dot).
func parsePatterns(list []string) ([]routing.Pattern, error) {
	var out []routing.Pattern
	for i, s := range list {
		p, err := routing.ParsePattern(s)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
		list[i] = p.String()
	}
	return out, nil
}

func checkShaping(data []byte, key string, s Shaping) error {
	if s.MaxConnections < 0 {
		return keyError(data, key+".max_connections", fmt.Sprintf("must not be negative, got %d (0 keeps the default)", s.MaxConnections))
	}
	if s.MaxMessagesPerConn < 0 {
		return keyError(data, key+".max_messages_per_connection", fmt.Sprintf("must not be negative, got %d (0: no limit)", s.MaxMessagesPerConn))
	}
	return nil
}

// Changed lists the keys whose values differ between a and b, as dotted
// names ("submission.auth_limit.failures"); a list of tables that differs
// anywhere is named once ("submission.users"). Path and the derived
// fields are not keys and are not compared.
func Changed(a, b *Config) []string {
	var keys []string
	diff(reflect.ValueOf(*a), reflect.ValueOf(*b), "", &keys)
	return keys
}

func diff(a, b reflect.Value, prefix string, keys *[]string) {
	t := a.Type()
	for i := range t.NumField() {
		f := t.Field(i)
		tag := f.Tag.Get("toml")
		if tag == "" || tag == "-" {
			continue
		}
		key := tag
		if prefix != "" {
			key = prefix + "." + tag
		}
		x, y := a.Field(i), b.Field(i)
		if f.Type.Kind() == reflect.Struct && isTable(f.Type) {
			diff(x, y, key, keys)
			continue
		}
		if !reflect.DeepEqual(x.Interface(), y.Interface()) {
			*keys = append(*keys, key)
		}
	}
}

// isTable reports whether t is a TOML table of ours rather than a value
// type such as Duration or Network.
func isTable(t reflect.Type) bool {
	for i := range t.NumField() {
		if tag := t.Field(i).Tag.Get("toml"); tag != "" && tag != "-" {
			return true
		}
	}
	return false
}

// isMailbox is a light check of an addr-spec: local@domain.
func isMailbox(s string) bool {
	local, domain, ok := strings.Cut(s, "@")
	return ok && local != "" && !strings.ContainsAny(local, " \t<>\\\"") && routing.IsDomain(domain) && strings.Contains(domain, ".")
}

// lineOf finds the line of a dotted key such as "delivery.workers" or
// "submission.users[1].name", tracking [table] and [[array]] headers.
func lineOf(data []byte, key string) int {
	table, leaf := "", key
	if i := strings.LastIndex(key, "."); i >= 0 {
		table, leaf = key[:i], key[i+1:]
	}
	// "submission.users[1]" → header "submission.users", second occurrence.
	want, index := table, 0
	if i := strings.IndexByte(table, '['); i >= 0 && strings.HasSuffix(table, "]") {
		want = table[:i]
		index, _ = strconv.Atoi(table[i+1 : len(table)-1])
	}
	current, seen := "", map[string]int{}
	headerLine := 0
	for n, line := range strings.Split(string(data), "\n") {
		t := strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(t, "[["):
			name := strings.TrimSpace(strings.Trim(t[:strings.Index(t+"]]", "]]")], "[ "))
			current = fmt.Sprintf("%s[%d]", name, seen[name])
			seen[name]++
			if name == want && seen[name]-1 == index && current == fmt.Sprintf("%s[%d]", want, index) {
				headerLine = n + 1
			}
			continue
		case strings.HasPrefix(t, "["):
			current = strings.TrimSpace(strings.Trim(t[:strings.Index(t+"]", "]")], "[ "))
			if current == table {
				headerLine = n + 1
			}
			continue
		}
		inTable := current == table || (table != want && current == fmt.Sprintf("%s[%d]", want, index))
		if !inTable {
			// A dotted key at top level: log.level = "x".
			if current == "" && table != "" && keyIs(t, table+"."+leaf) {
				return n + 1
			}
			continue
		}
		if keyIs(t, leaf) {
			return n + 1
		}
	}
	return headerLine
}

func keyIs(line, key string) bool {
	k, _, ok := strings.Cut(line, "=")
	return ok && strings.Trim(strings.TrimSpace(k), `"`) == key
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

func isPort(s string) bool {
	n, err := strconv.Atoi(s)
	return err == nil && n >= 0 && n <= 65535
}

func isBcrypt(h string) bool {
	return len(h) == 60 && (strings.HasPrefix(h, "$2a$") || strings.HasPrefix(h, "$2b$") || strings.HasPrefix(h, "$2y$"))
}

func validSenderPattern(p string) bool {
	if p == "*" {
		return true
	}
	local, domain, ok := strings.Cut(p, "@")
	// "*" stands only for a whole local part, as submission reads it: a
	// pattern it would refuse must be refused here, with its key. The
	// domain may be written in U-labels (submission compares A-labels).
	if domain = routing.ALabels(domain); domain == "" {
		return false
	}
	return ok && local != "" && !strings.Contains(domain, "@") && routing.IsDomain(domain) &&
		(local == "*" || !strings.Contains(local, "*"))
}

// Duration is a Go duration in TOML: "30s", "4h".
type Duration struct{ time.Duration }

func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return &valueError{fmt.Sprintf("%q is not a duration (use e.g. 30s, 5m or 120h)", b)}
	}
	d.Duration = v
	return nil
}

func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// Size is a byte count in TOML: 1048576, "512KB", "35MB", "1GB" (powers of
// 1024, as mail size limits conventionally are).
type Size int64

func (s *Size) UnmarshalText(b []byte) error {
	v, err := ParseSize(string(b))
	if err != nil {
		return &valueError{err.Error()}
	}
	*s = Size(v)
	return nil
}

// ParseSize reads "35MB" and friends.
func ParseSize(text string) (int64, error) {
	t := strings.ToUpper(strings.TrimSpace(text))
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"GIB", 1 << 30}, {"MIB", 1 << 20}, {"KIB", 1 << 10}, {"GB", 1 << 30}, {"MB", 1 << 20}, {"KB", 1 << 10}, {"B", 1}} {
		if strings.HasSuffix(t, u.suffix) {
			t, mult = strings.TrimSpace(strings.TrimSuffix(t, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("%q is not a size (use e.g. 35MB)", text)
	}
	return n * mult, nil
}

// Network is an IP network in TOML: "192.0.2.0/24", or one address.
type Network struct{ netip.Prefix }

func (n *Network) UnmarshalText(b []byte) error {
	s := string(b)
	if p, err := netip.ParsePrefix(s); err == nil {
		n.Prefix = p.Masked()
		return nil
	}
	if a, err := netip.ParseAddr(s); err == nil {
		n.Prefix = netip.PrefixFrom(a, a.BitLen())
		return nil
	}
	return &valueError{fmt.Sprintf("%q is not an IP network (use e.g. 192.0.2.0/24 or 2001:db8::/32)", s)}
}

// valueError is a bad value; the TOML library adds key and line.
type valueError struct{ msg string }

func (e *valueError) Error() string { return e.msg }

// Rate is a number of messages per period in TOML: "600/m", "10/s",
// "5000/h", "100/30s". The zero Rate is no limit.
type Rate struct {
	N   int
	Per time.Duration
}

func (r *Rate) UnmarshalText(b []byte) error {
	bad := &valueError{fmt.Sprintf("%q is not a rate (use e.g. 600/m, 10/s or 5000/h)", b)}
	n, per, ok := strings.Cut(strings.TrimSpace(string(b)), "/")
	count, err := strconv.Atoi(strings.TrimSpace(n))
	if !ok || err != nil || count <= 0 {
		return bad
	}
	per = strings.TrimSpace(per)
	if per == "s" || per == "m" || per == "h" {
		per = "1" + per
	}
	d, err := time.ParseDuration(per)
	if err != nil || d <= 0 {
		return bad
	}
	r.N, r.Per = count, d
	return nil
}

func (r Rate) MarshalText() ([]byte, error) {
	if r.N == 0 {
		return []byte(""), nil
	}
	return []byte(fmt.Sprintf("%d/%s", r.N, r.Per)), nil
}

// PerSecond is the rate as events per second; 0 for no limit.
func (r Rate) PerSecond() float64 {
	if r.N == 0 || r.Per <= 0 {
		return 0
	}
	return float64(r.N) / r.Per.Seconds()
}
