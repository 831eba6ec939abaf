package config

import (
	"os"
	"reflect"
	"regexp"
	"strings"
	"testing"
)

// errorForm is what every configuration error looks like: one line,
// naming the line or the key (docs/DESIGN.md, "Configuration").
var errorForm = regexp.MustCompile(`^(line \d+: )?[^\n]+$`)

// FuzzParse feeds arbitrary text to the configuration loader: it never
// panics, answers the same text the same way, explains a refusal in one
// line, and whatever it accepts is one configuration (no key spelled two
// ways racing for a field), passes its own validation again, and has
// every limit usable.
func FuzzParse(f *testing.F) {
	example, err := os.ReadFile("../config.toml.example")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(string(example))
	f.Add("hostname = \"relay.example.com\"\n")
	f.Add("[submission]\nmax_message_size = \"35MB\"\ntrusted_networks = [\"10.0.0.0/8\", \"::1\"]\n[[submission.users]]\nname = \"a\"\npassword_hash = \"" + testHash + "\"\nallowed_senders = [\"*@example.com\"]\n")
	f.Add("[delivery]\nretry_schedule = [\"5m\", \"1h\"]\n[[delivery.policy]]\ndomain = \"a.example\"\ntls = \"verify\"\n")
	f.Add("[submission.auth_limit]\nfailures = 0\n")
	f.Add("log.level = \"debug\"\n[sts]\nfetch_timeout = \"-1s\"\n")
	f.Add("[[submission.users]]\n[[submission.users]]\nname = \"x\"\n")
	f.Fuzz(func(t *testing.T, text string) {
		cfg, err := Parse([]byte(text))
		again, err2 := Parse([]byte(text))
		// With several errors in a file, which one is reported may vary:
		// the TOML library decodes tables in map order.
		if (err == nil) != (err2 == nil) {
			t.Fatalf("two answers to one text: %v / %v", err, err2)
		}
		if err != nil {
			if !errorForm.MatchString(err.Error()) {
				t.Fatalf("error is not one line: %q", err)
			}
			return
		}
		if !reflect.DeepEqual(cfg, again) {
			t.Fatalf("two configurations from one text:\n%+v\n%+v", cfg, again)
		}
		if err := cfg.validate([]byte(text)); err != nil {
			t.Fatalf("accepted configuration fails validation: %v", err)
		}
		s := cfg.Submission
		if s.MaxMessageSize <= 0 || s.MaxRecipients <= 0 || s.MaxHops <= 0 || s.MaxConnsPerIP <= 0 || s.MaxConns < s.MaxConnsPerIP ||
			s.CommandTimeout.Duration <= 0 || s.DataTimeout.Duration <= 0 || s.AuthRate.Failures <= 0 || s.AuthRate.Per.Duration <= 0 {
			t.Fatalf("unusable submission limits accepted: %+v", s)
		}
		d := cfg.Delivery
		if d.Workers <= 0 || d.MaxConnsPerDomain <= 0 || len(d.RetrySchedule) == 0 || d.MaxQueueTime.Duration <= 0 || d.ConnectTimeout.Duration <= 0 {
			t.Fatalf("unusable delivery limits accepted: %+v", d)
		}
		for _, u := range s.Users {
			if !strings.HasPrefix(u.PasswordHash, "$2") {
				t.Fatalf("user %q accepted without a bcrypt hash", u.Name)
			}
		}
		for _, p := range d.Policies {
			if p.Domain != strings.ToLower(p.Domain) || strings.HasSuffix(p.Domain, ".") {
				t.Fatalf("policy domain %q not canonical", p.Domain)
			}
		}
	})
}
