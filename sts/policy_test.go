package sts

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode/utf8"
)

func mustParse(t *testing.T, body string) *Policy {
	t.Helper()
	p, err := Parse([]byte(body))
	if err != nil {
		t.Fatalf("Parse(%q): %v", body, err)
	}
	return p
}

func TestParseAcceptsCRLFAndLF(t *testing.T) {
	for _, body := range []string{
		"version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n",
		"version: STSv1\r\nmode: enforce\r\nmx: mx.example.com\r\nmax_age: 86400\r\n",
		"version: STSv1\r\nmode: enforce\nmx: mx.example.com\r\nmax_age: 86400", // mixed, no final newline
	} {
		p := mustParse(t, body)
		if p.Mode != ModeEnforce || p.MaxAge != 86400*time.Second || !slices.Equal(p.MX, []string{"mx.example.com"}) {
			t.Errorf("Parse(%q) = %+v", body, p)
		}
	}
}

func TestParseCollectsEveryMXPattern(t *testing.T) {
	p := mustParse(t, "version: STSv1\nmode: testing\nmx: MX1.Example.COM.\nmx:\t*.example.net  \nmax_age: 0\n")
	if want := []string{"mx1.example.com", "*.example.net"}; !slices.Equal(p.MX, want) {
		t.Fatalf("MX = %q, want %q", p.MX, want)
	}
	if p.MaxAge != 0 {
		t.Fatalf("MaxAge = %v, want 0", p.MaxAge)
	}
}

func TestParseIgnoresUnknownKeys(t *testing.T) {
	p := mustParse(t, "version: STSv1\nmode: enforce\nfoo_bar.baz: anything goes here\nmx: mx.example.com\nmax_age: 60\n")
	if p.Mode != ModeEnforce {
		t.Fatalf("mode %q", p.Mode)
	}
}

func TestParseFirstOfRepeatedKeyWins(t *testing.T) {
	p := mustParse(t, "version: STSv1\nmode: testing\nmode: enforce\nmx: mx.example.com\nmax_age: 60\nmax_age: 999\n")
	if p.Mode != ModeTesting || p.MaxAge != 60*time.Second {
		t.Fatalf("got mode %q max_age %v, want the first values testing and 60s", p.Mode, p.MaxAge)
	}
}

func TestParseModeNoneNeedsNoMX(t *testing.T) {
	p := mustParse(t, "version: STSv1\nmode: none\nmax_age: 86400\n")
	if p.Mode != ModeNone || len(p.MX) != 0 {
		t.Fatalf("got %+v", p)
	}
}

func TestParseCapsMaxAgeAtOneYear(t *testing.T) {
	p := mustParse(t, "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 9999999999\n")
	if p.MaxAge != MaxMaxAge {
		t.Fatalf("MaxAge = %v, want the cap %v", p.MaxAge, MaxMaxAge)
	}
	p = mustParse(t, "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 31557600\n")
	if p.MaxAge != MaxMaxAge {
		t.Fatalf("MaxAge = %v, want %v", p.MaxAge, MaxMaxAge)
	}
}

func TestParseRejectsInvalidPolicies(t *testing.T) {
	const ok = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n"
	for name, body := range map[string]string{
		"no version":          "mode: enforce\nmx: mx.example.com\nmax_age: 86400\n",
		"wrong version":       strings.Replace(ok, "STSv1", "STSv2", 1),
		"version wrong case":  strings.Replace(ok, "STSv1", "stsv1", 1),
		"no mode":             "version: STSv1\nmx: mx.example.com\nmax_age: 86400\n",
		"bad mode":            strings.Replace(ok, "enforce", "reject", 1),
		"mode wrong case":     strings.Replace(ok, "enforce", "Enforce", 1),
		"key wrong case":      strings.Replace(ok, "mode:", "Mode:", 1),
		"no max_age":          "version: STSv1\nmode: enforce\nmx: mx.example.com\n",
		"negative max_age":    strings.Replace(ok, "86400", "-1", 1),
		"11-digit max_age":    strings.Replace(ok, "86400", "10000000000", 1),
		"max_age with unit":   strings.Replace(ok, "86400", "86400s", 1),
		"no mx under enforce": "version: STSv1\nmode: enforce\nmax_age: 86400\n",
		"no mx under testing": "version: STSv1\nmode: testing\nmax_age: 86400\n",
		"double wildcard":     strings.Replace(ok, "mx.example.com", "*.*.example.com", 1),
		"inner wildcard":      strings.Replace(ok, "mx.example.com", "mx.*.example.com", 1),
		"partial wildcard":    strings.Replace(ok, "mx.example.com", "mx*.example.com", 1),
		"bare wildcard":       strings.Replace(ok, "mx.example.com", "*.", 1),
		"space in mx":         strings.Replace(ok, "mx.example.com", "mx example.com", 1),
		"empty mx":            strings.Replace(ok, "mx.example.com", "", 1),
		"line without colon":  ok + "garbage\n",
		"space before colon":  strings.Replace(ok, "mode:", "mode :", 1),
		"space before key":    strings.Replace(ok, "mode:", " mode:", 1),
		"control character":   strings.Replace(ok, "enforce", "enf\x00orce", 1),
		"empty":               "",
		"html error page":     "<html><body>Not here</body></html>\n",
	} {
		t.Run(name, func(t *testing.T) {
			p, err := Parse([]byte(body))
			var pe *PolicyError
			if !errors.As(err, &pe) {
				t.Fatalf("Parse(%q) = %+v, %v; want a *PolicyError", body, p, err)
			}
		})
	}
}

func TestParseAcceptsUnicodeMXAsALabels(t *testing.T) {
	p := mustParse(t, "version: STSv1\nmode: enforce\nmx: mx.bücher.example\nmax_age: 60\n")
	if want := "mx.xn--bcher-kva.example"; p.MX[0] != want {
		t.Fatalf("MX = %q, want %q", p.MX, want)
	}
	if !p.Match("MX.xn--bcher-kva.example.") || !p.Match("mx.bücher.example") {
		t.Fatal("IDN MX did not match in either form")
	}
}

func TestMatchWildcardCoversExactlyOneLabel(t *testing.T) {
	p := mustParse(t, "version: STSv1\nmode: enforce\nmx: *.example.com\nmx: mx.example.net\nmax_age: 60\n")
	for host, want := range map[string]bool{
		"mail.example.com":    true,
		"MAIL.EXAMPLE.COM.":   true,
		"example.com":         false,
		"a.b.example.com":     false,
		".example.com":        false,
		"mailexample.com":     false,
		"mx.example.net":      true,
		"mx.example.net.":     true,
		"Mx.Example.Net":      true,
		"a.mx.example.net":    false,
		"mx.example.net.evil": false,
		"":                    false,
	} {
		if got := p.Match(host); got != want {
			t.Errorf("Match(%q) = %v, want %v", host, got, want)
		}
	}
}

func TestPolicyStringRoundTrips(t *testing.T) {
	p := mustParse(t, "version: STSv1\nmode: enforce\nmx: mx.example.com\nmx: *.example.net\nmax_age: 604800\n")
	q := mustParse(t, p.String())
	if q.Mode != p.Mode || q.MaxAge != p.MaxAge || !slices.Equal(q.MX, p.MX) {
		t.Fatalf("round trip: %+v != %+v", q, p)
	}
	if want := []string{"version: STSv1", "mode: enforce", "mx: mx.example.com", "mx: *.example.net", "max_age: 604800"}; !slices.Equal(p.Lines(), want) {
		t.Fatalf("Lines = %q", p.Lines())
	}
}

// FuzzParse checks that Parse never panics, that what it accepts is
// complete, and that an accepted policy survives a round trip through
// String. The seed corpus is in testdata/fuzz/FuzzParse.
func FuzzParse(f *testing.F) {
	f.Add([]byte("version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n"))
	f.Fuzz(func(t *testing.T, body []byte) {
		p, err := Parse(body)
		if err != nil {
			var pe *PolicyError
			if !errors.As(err, &pe) {
				t.Fatalf("error %v is not a *PolicyError", err)
			}
			return
		}
		if p.Version != "STSv1" || (p.Mode != ModeEnforce && p.Mode != ModeTesting && p.Mode != ModeNone) {
			t.Fatalf("accepted incomplete policy %+v", p)
		}
		if p.Mode != ModeNone && len(p.MX) == 0 {
			t.Fatalf("accepted %s policy without mx", p.Mode)
		}
		if p.MaxAge < 0 || p.MaxAge > MaxMaxAge {
			t.Fatalf("max_age %v out of range", p.MaxAge)
		}
		q, err := Parse([]byte(p.String()))
		if err != nil {
			t.Fatalf("String() of an accepted policy does not parse: %v\n%s", err, p)
		}
		if q.Mode != p.Mode || q.MaxAge != p.MaxAge || !slices.Equal(q.MX, p.MX) {
			t.Fatalf("round trip changed the policy: %+v != %+v", q, p)
		}
		for _, pattern := range p.MX {
			if !p.Match(strings.Replace(pattern, "*", "x", 1)) {
				t.Fatalf("pattern %q does not match its own example", pattern)
			}
		}
	})
}

func TestParseIgnoresBlankLines(t *testing.T) {
	p := mustParse(t, "version: STSv1\n\nmode: enforce\r\n\r\nmx: mx.example.com\nmax_age: 60\n\n")
	if p.Mode != ModeEnforce || len(p.MX) != 1 {
		t.Fatalf("got %+v", p)
	}
}

// A line of only blanks is no more allowed by the ABNF than an empty one,
// and looks the same to whoever wrote the policy: it is skipped alike.
func TestParseIgnoresWhitespaceOnlyLines(t *testing.T) {
	p := mustParse(t, "version: STSv1\n \nmode: enforce\r\n\t\r\nmx: mx.example.com\nmax_age: 60\n \t \n")
	if p.Mode != ModeEnforce || len(p.MX) != 1 || p.MaxAge != time.Minute {
		t.Fatalf("got %+v", p)
	}
}

// Errors quote hostile input shortened, never with half a character.
func TestParseErrorQuotesWholeCharacters(t *testing.T) {
	body := "version: STSv1\nmode: x" + strings.Repeat("é", 100) + "\nmx: mx.example.com\nmax_age: 86400\n"
	_, err := Parse([]byte(body))
	if err == nil || !utf8.ValidString(err.Error()) {
		t.Errorf("Parse error %q is not valid UTF-8", err)
	}
}
