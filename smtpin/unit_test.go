package smtpin

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

func TestParseMailbox(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		utf8     bool
		err      string // substring; "" = valid
	}{
		{in: "user@example.com", want: "user@example.com"},
		{in: "first.last+tag@sub.example.com", want: "first.last+tag@sub.example.com"},
		{in: "user@[192.0.2.1]", want: "user@[192.0.2.1]"},
		{in: "user@[IPv6:2001:db8::1]", want: "user@[IPv6:2001:db8::1]"},
		{in: "user@[ipv6:2001:db8::1]", want: "user@[ipv6:2001:db8::1]"}, // the tag is case-insensitive
		{in: "a@b@example.org", want: `"a@b"@example.org`},               // <"a@b"@example.org>, quotes dropped by go-smtp
		{in: "user@[IPv4:192.0.2.1]", err: "address literal"},
		{in: "john doe@example.com", want: `"john doe"@example.com`}, // go-smtp dropped the quotes
		{in: `a"b@example.com`, want: `"a\"b"@example.com`},
		{in: "jörg@exämple.de", want: "jörg@exämple.de", utf8: true},
		{in: "jörg@example.de", err: "SMTPUTF8"},
		{in: "user@example..com", err: "empty label"},
		{in: "user@-example.com", err: "'-'"},
		{in: "user@exa mple.com", err: "not allowed"},
		{in: "user@@example.com", err: "not allowed"},
		{in: "@user@example.com", err: "not allowed"},
		{in: "user@[300.1.1.1]", err: "address literal"},
		{in: "user@[192.0.2.1", err: "unclosed"},
		{in: "user\x01@example.com", err: "control"},
		{in: strings.Repeat("a", 65) + "@example.com", err: "64"},
		{in: "user@" + strings.Repeat("a.", 127) + "com", err: "253"},
		{in: "user", err: "@domain"},
	} {
		got, err := parseMailbox(tc.in, tc.utf8)
		switch {
		case tc.err == "" && (err != nil || got != tc.want):
			t.Errorf("parseMailbox(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("parseMailbox(%q) = %q, %v; want error containing %q", tc.in, got, err, tc.err)
		}
	}
}

func TestUserMayUseSender(t *testing.T) {
	u := &User{AllowedSenders: []string{"*@apps.example.com", "alerts@example.com"}}
	for from, want := range map[string]bool{
		"cron@apps.example.com":      true,
		"Cron@APPS.example.com":      true,
		"alerts@example.com":         true,
		"ALERTS@example.com":         true,
		"other@example.com":          false,
		"cron@x.apps.example.com":    false,
		"cron@apps.example.com.evil": false,
		"":                           false,
	} {
		if got := u.mayUseSender(from); got != want {
			t.Errorf("mayUseSender(%q) = %v, want %v", from, got, want)
		}
	}
	if !(&User{}).mayUseSender("") {
		t.Error("a user without allowed_senders may not use the null sender")
	}
	// "*" says explicitly what an empty list says.
	any := &User{AllowedSenders: []string{"alerts@example.com", "*"}}
	for _, from := range []string{"someone@elsewhere.example", ""} {
		if !any.mayUseSender(from) {
			t.Errorf(`allowed_senders with "*": mayUseSender(%q) = false`, from)
		}
	}
}

func TestSenderPatternChecked(t *testing.T) {
	for p, ok := range map[string]bool{
		"*@example.com": true, "a@example.com": true, "*": true,
		"example.com": false, "a*@example.com": false, "*@": false, "a@b@c": false,
	} {
		if err := checkSenderPattern(p); (err == nil) != ok {
			t.Errorf("checkSenderPattern(%q) = %v, want ok=%v", p, err, ok)
		}
	}
}

func TestReadHeaderFindsFieldsAndStopsAtBody(t *testing.T) {
	for _, tc := range []struct {
		name, msg                  string
		msgID, date, tlsRequiredNo bool
		rawLen                     int // bytes of msg read as header; -1 = all
	}{
		{name: "plain", msg: "Message-Id: <a@b>\r\nDate: x\r\n\r\nbody\r\n", msgID: true, date: true, rawLen: 30},
		{name: "folded TLS-Required", msg: "TLS-Required:\r\n\tNO\r\n\r\n", tlsRequiredNo: true, rawLen: -1},
		{name: "TLS-Required yes", msg: "TLS-Required: yes\r\n\r\n", rawLen: -1},
		{name: "Date in body is not a header", msg: "Subject: x\r\n\r\nDate: y\r\n", rawLen: 14},
		{name: "no header section", msg: "just text\r\nDate: y\r\n", rawLen: 11},
		{name: "no empty line", msg: "Subject: x\r\nDate: y\r\n", date: true, rawLen: -1},
		{name: "empty", msg: "", rawLen: 0},
		// RFC 5322 §4.5.3: obs-optional allows white space before the colon.
		{name: "space before colon", msg: "Subject : x\r\nMessage-ID \t: <a@b>\r\nDate\t: y\r\n\r\nbody\r\n",
			msgID: true, date: true, rawLen: 46},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, err := readHeader(bufio.NewReader(strings.NewReader(tc.msg)), 1000)
			if err != nil {
				t.Fatal(err)
			}
			want := tc.rawLen
			if want < 0 {
				want = len(tc.msg)
			}
			if h.hasMessageID != tc.msgID || h.hasDate != tc.date || h.tlsRequiredNo != tc.tlsRequiredNo || len(h.raw) != want {
				t.Errorf("got id=%v date=%v tlsNo=%v raw=%q; want %v %v %v and %d bytes",
					h.hasMessageID, h.hasDate, h.tlsRequiredNo, h.raw, tc.msgID, tc.date, tc.tlsRequiredNo, want)
			}
		})
	}
	h, err := readHeader(bufio.NewReader(strings.NewReader(
		"Received: a\r\n\tb\r\nreceived : c\r\nX-Received: d\r\nReceived: e\r\n\r\nReceived: f\r\n")), 1000)
	if err != nil || h.received != 3 {
		t.Errorf("counted %d Received fields (%v), want 3: folded lines, X-Received and the body's do not count", h.received, err)
	}
	_, err = readHeader(bufio.NewReader(strings.NewReader(strings.Repeat("X-A: b\r\n", 200))), 1000)
	if !errors.Is(err, errHeaderTooLarge) {
		t.Errorf("header of 1600 bytes with limit 1000: %v", err)
	}
}

func TestBodyReaderEnforcesCRLFAndSize(t *testing.T) {
	for _, tc := range []struct {
		in, out string
		err     error
	}{
		{in: "a\r\nb\r\n", out: "a\r\nb\r\n"},
		{in: "a\r\nb", out: "a\r\nb\r\n"}, // BDAT without final CRLF
		{in: "", out: ""},
		{in: "a\nb\r\n", err: errBareLF},
		{in: "a\rb\r\n", err: errBareCR},
		{in: "a\r\nb\r", err: errBareCR},
		{in: "\n", err: errBareLF},
		{in: strings.Repeat("x", 11) + "\r\n", err: errLineTooLong},
		{in: strings.Repeat("x", 8) + "\r\n", out: strings.Repeat("x", 8) + "\r\n"},
		{in: "a\x00b\r\n", err: errNUL},
		{in: "12345678\r\n123456\r\n", out: "12345678\r\n123456\r\n"}, // exactly max
		{in: "12345678\r\n1234567\r\n", err: errTooLarge},
	} {
		// One byte per read, so that CR and LF fall into separate reads.
		b := &bodyReader{r: &oneByteReader{s: tc.in}, maxLine: 10, max: 18}
		got, err := io.ReadAll(b)
		if !errors.Is(err, tc.err) || (tc.err == nil && string(got) != tc.out) {
			t.Errorf("%q: got %q, %v; want %q, %v", tc.in, got, err, tc.out, tc.err)
		}
	}
}

type oneByteReader struct{ s string }

func (r *oneByteReader) Read(p []byte) (int, error) {
	if r.s == "" {
		return 0, io.EOF
	}
	p[0] = r.s[0]
	r.s = r.s[1:]
	return 1, nil
}

func TestClientKeyGroupsIPv6By64(t *testing.T) {
	a := clientKey(netip.MustParseAddr("2001:db8:1:2::1"))
	b := clientKey(netip.MustParseAddr("2001:db8:1:2:ffff::9"))
	c := clientKey(netip.MustParseAddr("2001:db8:1:3::1"))
	if a != b || a == c {
		t.Errorf("keys %v %v %v: want the first two equal and the third different", a, b, c)
	}
	if v4a, v4b := clientKey(netip.MustParseAddr("192.0.2.1")), clientKey(netip.MustParseAddr("192.0.2.2")); v4a == v4b {
		t.Error("two IPv4 clients share a key")
	}
}

// An unknown user name must cost a bcrypt comparison like a known one,
// or the reply time tells which names exist.
func TestUnknownUserTakesAsLongAsWrongPassword(t *testing.T) {
	h, _ := bcrypt.GenerateFromPassword([]byte("pw"), 8)
	s := &Server{}
	if err := s.SetUsers([]User{{Name: "known", PasswordHash: string(h)}}); err != nil {
		t.Fatal(err)
	}
	db := s.users.Load()
	measure := func(name string) time.Duration {
		begin := time.Now()
		if _, ok := db.authenticate(name, "wrong"); ok {
			t.Fatal("authenticated with a wrong password")
		}
		return time.Since(begin)
	}
	known, unknown := measure("known"), measure("unknown")
	if unknown < known/4 {
		t.Errorf("unknown user took %v, known user with wrong password %v", unknown, known)
	}
	if _, ok := db.authenticate("known", "pw"); !ok {
		t.Error("right password refused")
	}
}

// A password that passed bcrypt is taken on its HMAC for a while; a wrong
// one, an expired entry and a reload of the users all cost bcrypt again.
func TestVerifiedPasswordSkipsBcryptUntilItExpires(t *testing.T) {
	h, _ := bcrypt.GenerateFromPassword([]byte("pw"), 4)
	s := &Server{}
	users := []User{{Name: "app", PasswordHash: string(h)}}
	if err := s.SetUsers(users); err != nil {
		t.Fatal(err)
	}
	db := s.users.Load()
	compares := 0
	db.compare = func(hash, pw []byte) error { compares++; return bcrypt.CompareHashAndPassword(hash, pw) }
	clock := time.Date(2026, 12, 5, 12, 0, 0, 0, time.UTC)
	db.now = func() time.Time { return clock }
	check := func(step, pw string, wantOK bool, wantCompares int) {
		t.Helper()
		if _, ok := db.authenticate("app", pw); ok != wantOK || compares != wantCompares {
			t.Errorf("%s: ok=%v after %d bcrypt checks, want ok=%v after %d", step, ok, compares, wantOK, wantCompares)
		}
	}
	check("first", "pw", true, 1)
	check("again", "pw", true, 1)
	check("wrong password", "pW", false, 2)
	check("right again", "pw", true, 2)
	clock = clock.Add(verifiedTTL)
	check("expired", "pw", true, 3)
	if len(db.verified) != 1 {
		t.Errorf("%d cache entries for one user", len(db.verified))
	}
	if _, ok := db.authenticate("nobody", "pw"); ok || len(db.verified) != 1 {
		t.Error("an unknown name was cached or accepted")
	}
	if err := s.SetUsers(users); err != nil {
		t.Fatal(err)
	}
	if len(s.users.Load().verified) != 0 {
		t.Error("a reload kept the verified passwords")
	}
}

func TestAuthLimiterBlocksAUserAfterItsBurstAndTheClientAfterMore(t *testing.T) {
	l := newAuthLimiter(DefaultAuthFailures, DefaultAuthFailuresPerIP, DefaultAuthFailuresPer)
	k := clientKey(netip.MustParseAddr("192.0.2.7"))
	other := clientKey(netip.MustParseAddr("192.0.2.8"))
	for i := range DefaultAuthFailures {
		if b := l.blocked(k, "app1"); b != "" {
			t.Fatalf("blocked (%s) after %d failures", b, i)
		}
		l.failed(k, "app1")
	}
	if b := l.blocked(k, "app1"); b != "user" {
		t.Fatalf("after the burst: blocked %q, want user", b)
	}
	// Another application on the same host is not locked out.
	if b := l.blocked(k, "app2"); b != "" {
		t.Fatalf("another user from the same client blocked (%s)", b)
	}
	if b := l.blocked(other, "app1"); b != "" {
		t.Fatalf("the same user from another client blocked (%s)", b)
	}
	// Guessing across names meets the client's own, higher cap.
	for i := DefaultAuthFailures; i < DefaultAuthFailuresPerIP; i++ {
		l.failed(k, fmt.Sprintf("guess%d", i))
	}
	if b := l.blocked(k, "app2"); b != "client" {
		t.Fatalf("after %d failures over many names: blocked %q, want client", DefaultAuthFailuresPerIP, b)
	}

	// Keys whose allowance is full again are forgotten when the table
	// fills up.
	clock := time.Now()
	l.now = func() time.Time { return clock }
	for i := 0; len(l.m) < authLimiterSize-1; i++ { // one short of a cut
		l.failed(sprayClient(i), "u")
	}
	clock = clock.Add(DefaultAuthFailuresPerIP * DefaultAuthFailuresPer)
	l.failed(clientKey(netip.MustParseAddr("198.51.100.1")), "u")
	if len(l.m) != 2 {
		t.Errorf("limiter remembers %d keys after forgetting idle ones, want 2", len(l.m))
	}
}

// sprayClient is the i-th of many client addresses.
func sprayClient(i int) netip.Prefix {
	return clientKey(netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}))
}

// A password spray from more clients than the limiter remembers costs each
// failure a few keys looked at, not the whole table under the lock every
// AUTH takes; the table stays bounded, and a client that used up its
// allowance stays blocked through the spray.
func TestAuthLimiterSprayCostsFewKeysPerFailureAndStaysBounded(t *testing.T) {
	l := newAuthLimiter(DefaultAuthFailures, DefaultAuthFailuresPerIP, DefaultAuthFailuresPer)
	clock := time.Now()
	l.now = func() time.Time { return clock } // no allowance refills during the spray
	guesser := clientKey(netip.MustParseAddr("192.0.2.7"))
	for i := range DefaultAuthFailuresPerIP {
		l.failed(guesser, fmt.Sprintf("guess%d", i))
	}
	i := 0
	for ; len(l.m) < authLimiterSize-1; i++ { // one short of a cut
		l.failed(sprayClient(i), "admin")
		clock = clock.Add(time.Millisecond)
	}
	l.scanned = 0
	const spray = 3 * authLimiterSize
	for range spray {
		l.failed(sprayClient(i), "admin")
		i++
		clock = clock.Add(time.Millisecond)
		if len(l.m) > authLimiterSize {
			t.Fatalf("the limiter holds %d keys, more than its %d", len(l.m), authLimiterSize)
		}
	}
	// Two keys per failure; a cut looks at a full table at most twice
	// and comes once per authLimiterSize-authLimiterKeep new keys.
	bound := 2 * 2 * authLimiterSize / (authLimiterSize - authLimiterKeep)
	if per := l.scanned / spray; per > bound {
		t.Errorf("each failure looked at %d keys on average (%d in all), want at most %d", per, l.scanned, bound)
	}
	if b := l.blocked(guesser, "admin"); b != "client" {
		t.Errorf("after the spray the guessing client is blocked %q, want client", b)
	}
	if b := l.blocked(sprayClient(i-1), "admin"); b != "" {
		t.Errorf("the spray's last client blocked %q after one failure", b)
	}
	if _, ok := l.m[userKey(sprayClient(i-1), "admin")]; !ok {
		t.Error("the latest failure was forgotten")
	}
}

// A pool of connections opened at once sends one password on each: they
// wait for one bcrypt check, and only identical attempts share it.
func TestConcurrentIdenticalAuthsShareOneBcryptCheck(t *testing.T) {
	h, _ := bcrypt.GenerateFromPassword([]byte("pw"), 4)
	s := &Server{}
	if err := s.SetUsers([]User{{Name: "app", PasswordHash: string(h)}}); err != nil {
		t.Fatal(err)
	}
	db := s.users.Load()
	var mu sync.Mutex
	compares := map[string]int{}
	release := make(chan struct{})
	db.compare = func(hash, pw []byte) error {
		mu.Lock()
		compares[string(pw)]++
		mu.Unlock()
		<-release
		return bcrypt.CompareHashAndPassword(hash, pw)
	}
	type attempt struct {
		pw string
		ok bool
	}
	results := make(chan attempt)
	for i := range 40 {
		name, pw := "app", "pw"
		switch {
		case i%4 == 0:
			pw = "wrong"
		case i%4 == 1:
			// An unknown name shares its check too: otherwise a burst
			// would take longer for it than for a known one.
			name, pw = "nobody", "guess"
		}
		go func() {
			_, ok := db.authenticate(name, pw)
			results <- attempt{pw, ok}
		}()
	}
	// Let the attempts pile up on the first checks (without sharing, each
	// would be in its own by now), then let the checks finish.
	time.Sleep(200 * time.Millisecond)
	close(release)
	for range 40 {
		r := <-results
		if r.ok != (r.pw == "pw") {
			t.Errorf("password %q: ok=%v", r.pw, r.ok)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if compares["pw"] != 1 || compares["wrong"] != 1 || compares["guess"] != 1 {
		t.Errorf("bcrypt checks: %v, want one for each name and password", compares)
	}
	if len(db.checking) != 0 {
		t.Errorf("%d checks left in progress", len(db.checking))
	}
}
