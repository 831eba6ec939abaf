package smtpin

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/stsrelay/stsrelay/routing"
)

// User may submit mail after SASL PLAIN or LOGIN.
type User struct {
	Name         string
	PasswordHash string // bcrypt, as printed by HashPassword
	// AllowedSenders restricts MAIL FROM: "user@domain" or "*@domain",
	// compared without regard to case. Empty, or "*" among them, allows
	// any sender (the configuration may say so explicitly).
	AllowedSenders []string
}

// PasswordCost is the bcrypt cost HashPassword uses: bcrypt.DefaultCost.
// Submission passwords are machine credentials checked on every connection
// of applications that often connect once per message (a password that
// passed is then remembered for a while, see userDB); they should be long
// and random, which protects them better than a higher cost would.
const PasswordCost = bcrypt.DefaultCost

// HashPassword returns the bcrypt hash of password for [[submission.users]].
func HashPassword(password []byte) (string, error) {
	if len(password) == 0 {
		return "", errors.New("password is empty")
	}
	if len(password) > 72 {
		return "", errors.New("password is longer than 72 bytes, which bcrypt cannot use")
	}
	h, err := bcrypt.GenerateFromPassword(password, PasswordCost)
	if err != nil {
		return "", err
	}
	return string(h), nil
}

// userDB is the user table in force; SetUsers swaps it whole, which also
// empties its cache of verified passwords.
type userDB struct {
	users map[string]*User
	// dummyHash is checked for unknown names, so that the reply takes as
	// long as for a known name with a wrong password.
	dummyHash []byte

	// Applications often connect once per message, and a bcrypt check
	// costs tens of milliseconds of CPU: the relay would spend more on
	// AUTH than on the mail. So a password that passed bcrypt is
	// remembered for verifiedTTL as an HMAC under a key of this table's
	// own, never as itself; only a configured name's last good password,
	// so the cache is as large as the user list at most. A wrong
	// password still costs a full bcrypt check (and counts toward the
	// lockout), and unknown names are never cached.
	compare  func(hash, password []byte) error
	now      func() time.Time
	cacheKey [32]byte
	mu       sync.Mutex
	verified map[string]verifiedPassword
	// checking holds the bcrypt checks in progress, by name and HMAC:
	// an application that opens its pool of connections at once sends
	// the same password on each, and they wait for one check rather than
	// running twenty side by side. Only identical attempts share one, so
	// an attempt learns nothing its own password did not tell it, and an
	// unknown name's attempts share the dummy check alike, so that a
	// burst takes as long for it as for a configured name.
	checking map[checkKey]*pendingCheck
}

type checkKey struct {
	name string
	mac  [sha256.Size]byte
}

type pendingCheck struct {
	done chan struct{}
	ok   bool // set before done is closed
}

// verifiedTTL is how long a password that passed bcrypt is taken on its
// HMAC alone.
const verifiedTTL = 15 * time.Minute

type verifiedPassword struct {
	mac   [sha256.Size]byte
	until time.Time
}

// SetUsers replaces the users (on SIGHUP). On error the old users stay.
// Sessions already authenticated keep the rights they logged in with.
func (s *Server) SetUsers(users []User) error {
	db := &userDB{users: make(map[string]*User, len(users)), compare: bcrypt.CompareHashAndPassword,
		now: time.Now, verified: make(map[string]verifiedPassword), checking: make(map[checkKey]*pendingCheck)}
	rand.Read(db.cacheKey[:]) // crypto/rand.Read never fails (Go 1.24+)
	cost := 0                 // the highest cost in use, so that the dummy check takes as long
	for i := range users {
		u := users[i]
		if u.Name == "" {
			return fmt.Errorf("submission user %d: name is empty", i+1)
		}
		if _, dup := db.users[u.Name]; dup {
			return fmt.Errorf("submission user %q: listed twice", u.Name)
		}
		c, err := bcrypt.Cost([]byte(u.PasswordHash))
		if err != nil {
			return fmt.Errorf("submission user %q: password_hash is not a bcrypt hash (make one with `stsrelay hash-password`)", u.Name)
		}
		cost = max(cost, c)
		for _, p := range u.AllowedSenders {
			if err := checkSenderPattern(p); err != nil {
				return fmt.Errorf("submission user %q: allowed_senders %q: %v", u.Name, p, err)
			}
		}
		u.AllowedSenders = slices.Clone(u.AllowedSenders)
		for i, p := range u.AllowedSenders {
			if local, domain, ok := strings.Cut(p, "@"); ok {
				u.AllowedSenders[i] = local + "@" + routing.ALabels(domain)
			}
		}
		db.users[u.Name] = &u
	}
	if cost == 0 {
		s.users.Store(db) // no users: AUTH is not offered, no dummy needed
		return nil
	}
	if old := s.users.Load(); old != nil {
		if c, _ := bcrypt.Cost(old.dummyHash); c == cost {
			db.dummyHash = old.dummyHash
		}
	}
	if db.dummyHash == nil {
		h, err := bcrypt.GenerateFromPassword([]byte(rand.Text()), cost)
		if err != nil {
			return fmt.Errorf("submission users: %v", err)
		}
		db.dummyHash = h
	}
	s.users.Store(db)
	return nil
}

// authenticate checks a name and password. It runs bcrypt even for an
// unknown name, so that timing does not tell which names exist, and
// shares a check in progress the same way for known and unknown names:
// a burst of identical attempts costs one check either way.
func (db *userDB) authenticate(name, password string) (*User, bool) {
	u := db.users[name]
	hash := db.dummyHash
	if u != nil {
		hash = []byte(u.PasswordHash)
	}
	var mac [sha256.Size]byte
	h := hmac.New(sha256.New, db.cacheKey[:])
	h.Write([]byte(password))
	h.Sum(mac[:0])
	k := checkKey{name: name, mac: mac}
	db.mu.Lock()
	v, ok := db.verified[name] // only configured names are ever there
	if ok && db.now().Before(v.until) && hmac.Equal(v.mac[:], mac[:]) {
		db.mu.Unlock()
		return u, true
	}
	p := db.checking[k]
	if p == nil {
		p = &pendingCheck{done: make(chan struct{})}
		db.checking[k] = p
		db.mu.Unlock()
		p.ok = db.compare(hash, []byte(password)) == nil && u != nil
		db.mu.Lock()
		delete(db.checking, k)
		if p.ok {
			db.verified[name] = verifiedPassword{mac: mac, until: db.now().Add(verifiedTTL)}
		}
		db.mu.Unlock()
		close(p.done)
	} else {
		db.mu.Unlock()
		<-p.done
	}
	if !p.ok {
		return nil, false
	}
	return u, true
}

func checkSenderPattern(p string) error {
	if p == "*" {
		return nil
	}
	local, domain, ok := strings.Cut(p, "@")
	if !ok || local == "" || domain == "" || strings.Contains(domain, "@") {
		return errors.New(`want "user@domain", "*@domain" or "*"`)
	}
	if strings.Contains(local, "*") && local != "*" {
		return errors.New(`"*" stands only for the whole local part, as in "*@domain"`)
	}
	if a := routing.ALabels(domain); a == "" || checkDomain(a) != nil || strings.HasPrefix(a, "[") {
		return fmt.Errorf("%q is not a domain name", domain)
	}
	return nil
}

// SenderAllowed reports whether the login user may use address as its
// sender under the users now in force (SIGHUP included): the rule MAIL
// FROM is held to, for whoever checks the message's other addresses, as
// dkimsign does From:. A login no longer configured may use none.
func (s *Server) SenderAllowed(user, address string) bool {
	u := s.users.Load().users[user]
	if u == nil {
		return false
	}
	addr, err := parseMailbox(address, true)
	return err == nil && u.mayUseSender(addr)
}

// mayUseSender reports whether u may use from as MAIL FROM.
func (u *User) mayUseSender(from string) bool {
	if len(u.AllowedSenders) == 0 || slices.Contains(u.AllowedSenders, "*") {
		return true
	}
	at := strings.LastIndexByte(from, '@') // a quoted local part may hold one
	if at < 0 {
		return false // the null sender too: it is for bounces, not for users
	}
	local, domain := from[:at], routing.ALabels(from[at+1:])
	if domain == "" {
		return false
	}
	for _, p := range u.AllowedSenders {
		pl, pd, _ := strings.Cut(p, "@") // pd in A-labels (SetUsers)
		if pd != domain {
			continue
		}
		if pl == "*" || strings.EqualFold(pl, local) {
			return true
		}
	}
	return false
}

// authLimiter counts failed AUTH attempts per client and user name: a
// burst of burst failures, then one more per every. One application with a
// wrong password on a shared host so locks out only its own name; the
// client as a whole has a higher allowance, ipBurst, against guessing
// across many names.
//
// A key holds one time, when its allowance is full again: each failure
// moves it one every later (a token bucket kept as a time, as GCRA does).
// Forgetting a key is then a comparison, not a computation per key.
type authLimiter struct {
	mu      sync.Mutex
	m       map[authKey]time.Time
	burst   int
	ipBurst int
	every   time.Duration
	now     func() time.Time
	scanned int // keys looked at by prune, which tests hold to a bound
}

// authKey is a client, with a user name or "" for the client as a whole.
type authKey struct {
	client netip.Prefix
	user   string
}

// A new key when authLimiterSize are held makes prune cut the table to
// authLimiterKeep: every key looked at there pays for the thousands of
// failures recorded before the next cut, not for one.
const (
	authLimiterSize = 10000
	authLimiterKeep = authLimiterSize * 3 / 4
)

// maxUserKey bounds the user name kept in a key: names are the client's
// to choose.
const maxUserKey = 256

func newAuthLimiter(burst, ipBurst int, every time.Duration) *authLimiter {
	return &authLimiter{m: make(map[authKey]time.Time), burst: burst, ipBurst: max(ipBurst, burst), every: every, now: time.Now}
}

func userKey(client netip.Prefix, user string) authKey {
	if len(user) > maxUserKey {
		user = user[:maxUserKey]
	}
	return authKey{client, user}
}

// blocked says which allowance of client trying user is used up: "user",
// "client", or "" when it may try.
func (l *authLimiter) blocked(client netip.Prefix, user string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	if l.usedUp(authKey{client: client}, l.ipBurst, now) {
		return "client"
	}
	if l.usedUp(userKey(client, user), l.burst, now) {
		return "user"
	}
	return ""
}

// usedUp reports whether k has less than one failure left: its allowance
// is full again more than burst-1 intervals from now.
func (l *authLimiter) usedUp(k authKey, burst int, now time.Time) bool {
	full, ok := l.m[k]
	return ok && full.Sub(now) > time.Duration(burst-1)*l.every
}

// failed records a failed attempt by client for user.
func (l *authLimiter) failed(client netip.Prefix, user string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	l.use(authKey{client: client}, l.ipBurst, now)
	l.use(userKey(client, user), l.burst, now)
}

// use takes one failure from k's allowance, if one is left.
func (l *authLimiter) use(k authKey, burst int, now time.Time) {
	full, ok := l.m[k]
	if !ok && len(l.m) >= authLimiterSize {
		l.prune(now)
	}
	if l.usedUp(k, burst, now) {
		return // the lockout is at most a full burst long
	}
	if full.Before(now) {
		full = now
	}
	l.m[k] = full.Add(l.every)
}

// prune forgets the keys whose allowance is full again: remembering them
// changes nothing. When a spray from more clients than the table holds
// leaves more than authLimiterKeep, it forgets those nearest to full too
// (ties alike), so that memory stays bounded; a client that used up its
// allowance lately is among the last to go.
func (l *authLimiter) prune(now time.Time) {
	l.scanned += len(l.m)
	fulls := make([]time.Time, 0, len(l.m))
	for k, full := range l.m {
		if !full.After(now) {
			delete(l.m, k)
			continue
		}
		fulls = append(fulls, full)
	}
	if len(l.m) <= authLimiterKeep {
		return
	}
	l.scanned += len(l.m)
	slices.SortFunc(fulls, time.Time.Compare)
	cut := fulls[len(fulls)-authLimiterKeep-1]
	for k, full := range l.m {
		if !full.After(cut) {
			delete(l.m, k)
		}
	}
}

// loginServer is SASL LOGIN (draft-murchison-sasl-login), which go-sasl
// has only as a client; Outlook and many applications still use it.
type loginServer struct {
	step     int
	username string
	check    func(username, password string) error
}

func (a *loginServer) Next(response []byte) (challenge []byte, done bool, err error) {
	switch a.step {
	case 0:
		a.step = 1
		if response == nil {
			return []byte("Username:"), false, nil
		}
		fallthrough // the initial response is the user name
	case 1:
		a.username = string(response)
		a.step = 2
		return []byte("Password:"), false, nil
	case 2:
		a.step = 3
		return nil, true, a.check(a.username, string(response))
	}
	return nil, true, errors.New("unexpected AUTH LOGIN response")
}
