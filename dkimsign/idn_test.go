package dkimsign

import (
	"context"
	"io"
	"strings"
	"testing"

	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/smtpin"
)

type noQueue struct{}

func (noQueue) Enqueue(context.Context, queue.Envelope, io.Reader) (string, error) {
	return "", io.ErrUnexpectedEOF
}

// The key a From: picks and the allowed_senders rule it is checked
// against must read the domain alike. IDNA's mapping folds "ẞ" to "ss"
// and "İ" to "i̇", where Go's strings.ToLower gives "ß" and "i": read one
// way for the key and the other for the rule, a login allowed strasse.de
// had its mail signed for straße.de, another tenant's domain.
func TestKeyAndAllowedSendersReadADomainAlike(t *testing.T) {
	hash, err := smtpin.HashPassword([]byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	srv, err := smtpin.New(smtpin.Options{Hostname: "relay.test", Listen: "127.0.0.1:0",
		Users: []smtpin.User{{Name: "mallory", PasswordHash: hash, AllowedSenders: []string{"*@strasse.de", "*@xn--i-9bb.example"}}}}, noQueue{})
	if err != nil {
		t.Fatal(err)
	}
	strasse, _ := edKey(t, "xn--strae-oqa.de", "s1") // straße.de
	dotless, _ := edKey(t, "i.example", "s1")
	s, err := New(Options{Keys: []Key{strasse, dotless}, SenderAllowed: srv.SenderAllowed})
	if err != nil {
		t.Fatal(err)
	}
	for _, from := range []string{"a@STRAẞE.de", "a@İ.example"} {
		m := "From: <" + from + ">\r\nTo: <b@example.net>\r\nSubject: hi\r\n\r\nbody\r\n"
		j := job("a@strasse.de", m)
		j.Envelope.User = "mallory"
		if got := deliver(t, s, j); strings.Contains(got, "DKIM-Signature") {
			t.Errorf("From: <%s> signed for a domain the login may not use:\n%s", from, got)
		}
	}
	// The form the rule allows is signed for nobody else's key, and the
	// key of the name as IDNA reads it signs the mail of a login allowed it.
	own, _ := edKey(t, "strasse.de", "s1")
	s, _ = New(Options{Keys: []Key{strasse, own}, SenderAllowed: srv.SenderAllowed})
	j := job("a@strasse.de", "From: <a@STRAẞE.de>\r\nSubject: hi\r\n\r\nbody\r\n")
	j.Envelope.User = "mallory"
	got := deliver(t, s, j)
	if !strings.Contains(got, "d=strasse.de;") {
		t.Errorf("not signed with strasse.de's key:\n%s", got)
	}
}
