package main

// Signing relayed mail with [[dkim]] sign_relayed, through the binary: a
// message submitted over a real socket, relayed through a route to a
// go-smtp sink on a free port, its signature checked against the public
// key in a test DNS server.

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-msgauth/dkim"
	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/resolve"
)

type dkimWorld struct {
	t      *testing.T
	dir    string
	dns    *dnstest.Server
	rsaKey *rsa.PrivateKey
	edKey  ed25519.PrivateKey
}

// newDKIMWorld writes an RSA key for example.com (selector s1) and an
// Ed25519 key for example.org (selector ed), and publishes both.
func newDKIMWorld(t *testing.T) *dkimWorld {
	w := &dkimWorld{t: t, dir: t.TempDir()}
	var err error
	if w.rsaKey, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
		t.Fatal(err)
	}
	_, w.edKey, _ = ed25519.GenerateKey(rand.Reader)
	os.WriteFile(filepath.Join(w.dir, "rsa.pem"), pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(w.rsaKey)}), 0o600)
	p8, _ := x509.MarshalPKCS8PrivateKey(w.edKey)
	os.WriteFile(filepath.Join(w.dir, "ed.pem"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: p8}), 0o600)
	der, _ := x509.MarshalPKIXPublicKey(&w.rsaKey.PublicKey)
	rsaPub := "v=DKIM1; k=rsa; p=" + base64.StdEncoding.EncodeToString(der)
	edPub := "v=DKIM1; k=ed25519; p=" + base64.StdEncoding.EncodeToString(w.edKey.Public().(ed25519.PublicKey))
	w.dns = dnstest.New(t,
		`s1._domainkey.example.com. 60 IN TXT "`+rsaPub[:200]+`" "`+rsaPub[200:]+`"`,
		`ed._domainkey.example.org. 60 IN TXT "`+edPub+`"`,
	)
	return w
}

// verify checks msg's DKIM signatures against the test DNS and returns
// the signing domains of the valid ones; an invalid one fails the test.
func (w *dkimWorld) verify(msg string) []string {
	w.t.Helper()
	res, err := resolve.New(resolve.Config{Servers: []string{w.dns.Addr}})
	if err != nil {
		w.t.Fatal(err)
	}
	vs, err := dkim.VerifyWithOptions(strings.NewReader(msg), &dkim.VerifyOptions{
		LookupTXT: func(name string) ([]string, error) {
			txts, _, err := res.TXT(context.Background(), name)
			return txts, err
		},
	})
	if err != nil {
		w.t.Fatalf("DKIM verification: %v", err)
	}
	var domains []string
	for _, v := range vs {
		if v.Err != nil {
			w.t.Fatalf("DKIM signature of %s does not verify: %v", v.Domain, v.Err)
		}
		domains = append(domains, v.Domain)
	}
	return domains
}

func dkimMessage(from, extra, body string) string {
	return "From: " + from + "\r\nTo: <user@example.net>\r\nSubject: dkim test\r\nDate: Sat, 05 Dec 2026 22:00:00 +0000\r\n" +
		"Message-ID: <" + fmt.Sprint(time.Now().UnixNano()) + "@example.com>\r\n" + extra + "\r\n" + body
}

func TestEndToEndSignsRelayedMailFromItsDomains(t *testing.T) {
	w := newDKIMWorld(t)
	k := startSinkAt(t, "127.0.0.1:0", nil)
	config := writeConfig(t, w.dir, configParts{resolver: w.dns.Addr, tail: sinkRoute(k) + `
[[dkim]]
domain = "example.com"
selector = "s1"
key_file = "rsa.pem"
sign_relayed = true
[[dkim]]
domain = "example.org"
selector = "ed"
key_file = "ed.pem"
sign_relayed = true
[[dkim]]
domain = "example.org"
selector = "reports"
key_file = "rsa.pem"
`})
	d := startDaemon(t, config)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("relay log:\n%s", d.output())
		}
	})
	addr := d.submissionAddr()
	deliver := func(from, msg string) string {
		t.Helper()
		submit(t, addr, from, "user@example.net", msg)
		return k.wait(t, 30*time.Second).Data
	}
	signatures := func(msg string) int { return strings.Count(strings.ToLower(msg), "\r\ndkim-signature:") }

	t.Run("RSAFromTheDomain", func(t *testing.T) {
		msg := deliver("app@example.com", dkimMessage("App <app@example.com>", "", "Hello.\r\n"))
		if got := w.verify(msg); len(got) != 1 || got[0] != "example.com" {
			t.Fatalf("valid signatures from %v, want example.com:\n%s", got, msg)
		}
		if !strings.Contains(msg, "a=rsa-sha256") || !strings.Contains(msg, "c=relaxed/relaxed") || strings.Contains(msg, "; l=") {
			t.Errorf("signature tags:\n%s", msg)
		}
	})
	t.Run("Ed25519FromASubdomain", func(t *testing.T) {
		// The envelope sender is not what counts: From: is (DMARC).
		msg := deliver("bounces@elsewhere.test", dkimMessage("<news@mail.example.org>", "", "Hello.\r\n"))
		if got := w.verify(msg); len(got) != 1 || got[0] != "example.org" {
			t.Fatalf("valid signatures from %v, want example.org:\n%s", got, msg)
		}
		if !strings.Contains(msg, "a=ed25519-sha256") || !strings.Contains(msg, "s=ed;") {
			t.Errorf("signature tags:\n%s", msg)
		}
	})
	t.Run("OtherDomainUnsigned", func(t *testing.T) {
		msg := deliver("app@example.com", dkimMessage("<app@other.test>", "", "Hello.\r\n"))
		if n := signatures(msg); n != 0 {
			t.Fatalf("%d signatures on mail from other.test:\n%s", n, msg)
		}
	})
	t.Run("SeveralFromUnsigned", func(t *testing.T) {
		msg := deliver("app@example.com", dkimMessage("<a@example.com>, <b@example.com>", "Sender: <a@example.com>\r\n", "Hello.\r\n"))
		if n := signatures(msg); n != 0 {
			t.Fatalf("%d signatures on mail with two From: addresses:\n%s", n, msg)
		}
	})
	t.Run("AlreadySignedNotSignedAgain", func(t *testing.T) {
		var signed bytes.Buffer
		err := dkim.Sign(&signed, strings.NewReader(dkimMessage("<app@example.com>", "", "Signed by the application.\r\n")), &dkim.SignOptions{
			Domain: "example.com", Selector: "s1", Signer: w.rsaKey,
			HeaderCanonicalization: dkim.CanonicalizationRelaxed, BodyCanonicalization: dkim.CanonicalizationRelaxed,
		})
		if err != nil {
			t.Fatal(err)
		}
		msg := deliver("app@example.com", signed.String())
		if got := w.verify(msg); len(got) != 1 || got[0] != "example.com" {
			t.Fatalf("valid signatures from %v, want just the application's:\n%s", got, msg)
		}
	})
	t.Run("LargeMessage", func(t *testing.T) {
		// 6 MiB: above the queue's inline limit, so it is streamed to a
		// spool file and read through the signer from there.
		line := strings.Repeat("0123456789", 9) + "\r\n"
		body := strings.Repeat(line, 6<<20/len(line))
		msg := deliver("app@example.com", dkimMessage("<app@example.com>", "", body))
		if len(msg) < 6<<20 {
			t.Fatalf("received %d bytes", len(msg))
		}
		if got := w.verify(msg); len(got) != 1 || got[0] != "example.com" {
			t.Fatalf("valid signatures from %v, want example.com", got)
		}
	})
	if !strings.Contains(d.output(), "dkimsign: not signed") {
		t.Error("no debug line says why a message was not signed")
	}
	d.stop(syscall.SIGTERM)
}

func TestDKIMSignRelayedKeyErrorsStopTheStart(t *testing.T) {
	w := newDKIMWorld(t)
	os.WriteFile(filepath.Join(w.dir, "bad.pem"), []byte("not a key\n"), 0o600)
	for _, tc := range []struct{ file, want string }{
		{"missing.pem", "dkim[0].key_file: open " + filepath.Join(w.dir, "missing.pem")},
		{"bad.pem", "dkim[0].key_file: " + filepath.Join(w.dir, "bad.pem") + ": no PEM private key"},
	} {
		config := writeConfig(t, w.dir, configParts{tail: `
[[dkim]]
domain = "example.com"
selector = "s1"
key_file = "` + tc.file + `"
sign_relayed = true
`})
		d := startDaemon(t, config)
		select {
		case <-d.exited:
		case <-time.After(30 * time.Second):
			t.Fatalf("%s: the relay started:\n%s", tc.file, d.output())
		}
		out := d.output()
		if !strings.Contains(out, tc.want) {
			t.Errorf("%s: want %q in:\n%s", tc.file, tc.want, out)
		}
		last := strings.TrimSpace(out)
		assertOneLine(t, last[strings.LastIndex(last, "\n")+1:])
	}
}

// TestEndToEndSignsOnlyFromAddressesTheLoginMayUse: a login limited by
// allowed_senders cannot get the relay's signature for another domain by
// writing it in From: (DMARC would pass on it); its mail goes out
// unsigned. A trusted network still gets From: signed, and a SIGHUP that
// widens the login's rights applies to signing at once.
func TestEndToEndSignsOnlyFromAddressesTheLoginMayUse(t *testing.T) {
	w := newDKIMWorld(t)
	k := startSinkAt(t, "127.0.0.1:0", nil)
	hash, err := bcrypt.GenerateFromPassword([]byte("webapp-pw"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	parts := func(allowed string) configParts {
		return configParts{resolver: w.dns.Addr,
			submission: fmt.Sprintf("[[submission.users]]\nname = \"webapp\"\npassword_hash = %q\nallowed_senders = [%s]\n", hash, allowed),
			tail: sinkRoute(k) + `
[[dkim]]
domain = "example.com"
selector = "s1"
key_file = "rsa.pem"
sign_relayed = true
`}
	}
	config := writeConfig(t, w.dir, parts(`"*@app.test"`))
	d := startDaemon(t, config)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("relay log:\n%s", d.output())
		}
	})
	addr := d.submissionAddr()
	login := func() *smtp.Client {
		t.Helper()
		c, err := smtp.Dial(addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if err := c.Auth(sasl.NewPlainClient("", "webapp", "webapp-pw")); err != nil {
			t.Fatalf("AUTH: %v", err)
		}
		return c
	}
	ceo := dkimMessage("CEO <ceo@example.com>", "", "Please wire the money.\r\n")

	err = login().SendMail("ceo@example.com", []string{"user@example.net"}, strings.NewReader(ceo))
	if e, ok := err.(*smtp.SMTPError); !ok || e.Code != 553 {
		t.Fatalf("MAIL FROM outside allowed_senders: %v, want 553", err)
	}

	if err := login().SendMail("webapp@app.test", []string{"user@example.net"}, strings.NewReader(ceo)); err != nil {
		t.Fatal(err)
	}
	msg := k.wait(t, 30*time.Second).Data
	if got := w.verify(msg); len(got) != 0 {
		t.Fatalf("signed by %v for a login not allowed to send as example.com:\n%s", got, msg)
	}
	d.waitFor(`dkimsign: not signed.*user=webapp.*ceo@example.com`)

	// A trusted network, without AUTH, signs as before.
	submit(t, addr, "app@example.com", "user@example.net", ceo)
	if got := w.verify(k.wait(t, 30*time.Second).Data); len(got) != 1 || got[0] != "example.com" {
		t.Fatalf("trusted network: valid signatures from %v, want example.com", got)
	}

	writeConfig(t, w.dir, parts(`"*@app.test", "ceo@example.com"`))
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.waitFor(`reload: users loaded`)
	if err := login().SendMail("webapp@app.test", []string{"user@example.net"}, strings.NewReader(ceo)); err != nil {
		t.Fatal(err)
	}
	if got := w.verify(k.wait(t, 30*time.Second).Data); len(got) != 1 || got[0] != "example.com" {
		t.Fatalf("after the reload allowed ceo@example.com: valid signatures from %v, want example.com", got)
	}
	d.stop(syscall.SIGTERM)
}
