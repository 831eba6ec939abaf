// Package config loads stsrelay's one TOML file: defaults, then the file,
// then validation. Every error names the key, its line and what is allowed
// (DESIGN.md decision 8). No other package reads the file.
package config

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
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
	Metrics    Metrics    `toml:"metrics"`

	// Path is the file this was loaded from.
	Path string `toml:"-"`
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
	MaxConnsPerIP   int        `toml:"max_connections_per_ip"`
	MaxConns        int        `toml:"max_connections"` // in all; trusted_networks are still let in
	CommandTimeout  Duration   `toml:"command_timeout"`
	DataTimeout     Duration   `toml:"data_timeout"`
	SessionTickets  bool       `toml:"tls_session_tickets"`
	ShowAuthUser    bool       `toml:"received_show_user"`
	Users           []User     `toml:"users"`
	AuthRate        AuthLimits `toml:"auth_limit"`
}

// AuthLimits rate-limits failed AUTH attempts per client IP.
type AuthLimits struct {
	Failures int      `toml:"failures"` // allowed in a burst
	Per      Duration `toml:"per"`      // one failure is forgiven per this long
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
	ConnectTimeout    Duration   `toml:"connect_timeout"`
	IPVersion         string     `toml:"ip_version"` // both | 4 | 6
	Policies          []Policy   `toml:"policy"`
}

// Policy is a local TLS policy for one destination domain, like an entry
// of Postfix's smtp_tls_policy_maps.
type Policy struct {
	Domain string `toml:"domain"`
	TLS    string `toml:"tls"` // may | encrypt | verify | dane-only | none
}

type STS struct {
	Enabled          bool     `toml:"enabled"`
	MatchCNAMETarget bool     `toml:"match_cname_target"`
	FetchTimeout     Duration `toml:"fetch_timeout"`
}

type DANE struct {
	Enabled bool `toml:"enabled"`
}

type TLSRPT struct {
	Enabled          bool   `toml:"enabled"`
	OrganizationName string `toml:"organization_name"`
	ContactInfo      string `toml:"contact_info"`
	ReportSender     string `toml:"report_sender"`
}

type Metrics struct {
	Listen string `toml:"listen"` // host:port for /metrics and /healthz; "" = off
}

// PolicyTLS lists the values [[delivery.policy]] tls accepts.
var PolicyTLS = []string{"may", "encrypt", "verify", "dane-only", "none"}

// Default returns the configuration used for every key the file leaves out.
func Default() *Config {
	host, _ := os.Hostname()
	return &Config{
		Hostname: host,
		StateDir: "/var/lib/stsrelay",
		Log:      Log{Level: "info", Format: "text"},
		Submission: Submission{
			Listen:         "127.0.0.1:587",
			MaxMessageSize: 35 << 20,
			MaxRecipients:  1000,
			MaxConnsPerIP:  20,
			MaxConns:       1000,
			CommandTimeout: Duration{5 * time.Minute},
			DataTimeout:    Duration{10 * time.Minute},
			AuthRate:       AuthLimits{Failures: 5, Per: Duration{time.Minute}},
		},
		DNS: DNS{Timeout: Duration{5 * time.Second}},
		Delivery: Delivery{
			Workers:           32,
			MaxConnsPerDomain: 10,
			// RFC 5321 §4.5.4.1 asks for a delayed first retry and 30
			// minutes between retries; the first two are shorter, as
			// Postfix's are, because greylisting clears in minutes.
			RetrySchedule: []Duration{
				{5 * time.Minute}, {10 * time.Minute}, {30 * time.Minute},
				{time.Hour}, {2 * time.Hour}, {4 * time.Hour},
			},
			MaxQueueTime:     Duration{120 * time.Hour},
			DelayNoticeAfter: Duration{4 * time.Hour},
			ConnectTimeout:   Duration{30 * time.Second},
			IPVersion:        "both",
		},
		STS:  STS{Enabled: true, FetchTimeout: Duration{10 * time.Second}},
		DANE: DANE{Enabled: true},
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
	for _, f := range []*string{&cfg.StateDir, &cfg.Submission.TLSCert, &cfg.Submission.TLSKey} {
		if *f != "" && !filepath.IsAbs(*f) {
			*f = filepath.Join(dir, *f)
		}
	}
	return cfg, nil
}

// Parse decodes and validates TOML text; relative paths stay as written.
func Parse(data []byte) (*Config, error) {
	return parse(data, Default())
}

// parse decodes data over cfg, which holds the defaults.
func parse(data []byte, cfg *Config) (*Config, error) {
	md, err := toml.Decode(string(data), cfg)
	if err != nil {
		return nil, decodeError(err)
	}
	if undecoded := md.Undecoded(); len(undecoded) > 0 {
		k := undecoded[0].String()
		return nil, keyError(data, k, "unknown key (see config.toml.example for the keys there are)")
	}
	// The TOML library matches keys to fields without regard to case, so
	// "Workers" and "workers" would both set one field, the last decoded
	// winning at random. Keys are spelled as documented, or refused.
	for _, k := range md.Keys() {
		if want, ok := spelling(reflect.TypeFor[Config](), k); !ok {
			return nil, keyError(data, k.String(), fmt.Sprintf("unknown key (keys are case-sensitive: %s)", want))
		}
	}
	if err := cfg.validate(data); err != nil {
		return nil, err
	}
	return cfg, nil
}

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
		for f := range t.Fields() {
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
func decodeError(err error) error {
	var pe toml.ParseError
	if !errors.As(err, &pe) {
		// Type mismatches: "toml: line 3 (last key "x"): incompatible types: …".
		return errors.New(oneLine(strings.TrimPrefix(err.Error(), "toml: ")))
	}
	if pe.LastKey != "" {
		return fmt.Errorf("line %d: %s: %s", pe.Position.Line, oneLine(pe.LastKey), oneLine(pe.Message))
	}
	return fmt.Errorf("line %d: %s", pe.Position.Line, oneLine(pe.Message))
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
	if line := lineOf(data, key); line > 0 {
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
	if !isDomain(c.Hostname) {
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
	if s.AuthRate.Per.Duration <= 0 {
		return bad("submission.auth_limit.per", "must be positive (use e.g. 1m)")
	}
	seen := map[string]bool{}
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
	if d.ConnectTimeout.Duration <= 0 {
		return bad("delivery.connect_timeout", "must be positive (use e.g. 30s)")
	}
	if !slices.Contains([]string{"both", "4", "6"}, d.IPVersion) {
		return bad("delivery.ip_version", "%q is not allowed (use both, 4 or 6)", d.IPVersion)
	}
	domains := map[string]bool{}
	for i, p := range d.Policies {
		key := fmt.Sprintf("delivery.policy[%d]", i)
		p.Domain = strings.ToLower(strings.TrimSuffix(p.Domain, "."))
		d.Policies[i].Domain = p.Domain
		if !isDomain(p.Domain) {
			return bad(key+".domain", "%q is not a domain name", p.Domain)
		}
		if domains[p.Domain] {
			return bad(key+".domain", "%s has two policies", p.Domain)
		}
		domains[p.Domain] = true
		if !slices.Contains(PolicyTLS, p.TLS) {
			return bad(key+".tls", "%q is not a TLS policy (use %s)", p.TLS, strings.Join(PolicyTLS, ", "))
		}
	}

	if c.STS.FetchTimeout.Duration <= 0 {
		return bad("sts.fetch_timeout", "must be positive (use e.g. 10s)")
	}
	if c.TLSRPT.Enabled {
		if c.TLSRPT.OrganizationName == "" {
			return bad("tlsrpt.organization_name", "must be set when tlsrpt.enabled is true")
		}
		if c.TLSRPT.ContactInfo == "" {
			return bad("tlsrpt.contact_info", "must be set when tlsrpt.enabled is true")
		}
	}
	return nil
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

func isPort(s string) bool {
	n, err := strconv.Atoi(s)
	return err == nil && n >= 0 && n <= 65535
}

// isDomain is a light syntax check: letters, digits, hyphens, dots, no
// empty labels, at most 253 octets (RFC 1035 §2.3.4).
func isDomain(s string) bool {
	s = strings.TrimSuffix(s, ".")
	if s == "" || len(s) > 253 {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return false
			}
		}
	}
	return true
}

func isBcrypt(h string) bool {
	return len(h) == 60 && (strings.HasPrefix(h, "$2a$") || strings.HasPrefix(h, "$2b$") || strings.HasPrefix(h, "$2y$"))
}

func validSenderPattern(p string) bool {
	if p == "*" {
		return true
	}
	local, domain, ok := strings.Cut(p, "@")
	return ok && local != "" && !strings.Contains(domain, "@") && isDomain(domain)
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
