package smtp_test

// Tests of stsrelay's changes to this copy of go-smtp (README.md).

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// A connection that ends inside a LAST chunk, short of its size, aborts
// the message: by a TCP close, and by a TLS close_notify, which
// crypto/tls reports as a clean end of the stream.
func TestServerBdatCutShortIsNotAMessage(t *testing.T) {
	for _, useTLS := range []bool{false, true} {
		name := "TCP close"
		if useTLS {
			name = "TLS close_notify"
		}
		t.Run(name, func(t *testing.T) {
			be, s, c, scanner, _ := testServerEhlo(t, func(s *smtp.Server) { s.TLSConfig = selfSigned(t) })
			defer s.Close()
			defer c.Close()
			be.dataErrors = make(chan error, 1)
			if useTLS {
				c, scanner = startTLS(t, c, scanner)
			}
			for _, cmd := range []string{"MAIL FROM:<root@nsa.gov>", "RCPT TO:<root@gchq.gov.uk>"} {
				io.WriteString(c, cmd+"\r\n")
				scanner.Scan()
				if !strings.HasPrefix(scanner.Text(), "250 ") {
					t.Fatalf("%s: %s", cmd, scanner.Text())
				}
			}
			io.WriteString(c, "BDAT 100 LAST\r\nSubject: cut short\r\n\r\n")
			c.Close()
			select {
			case err := <-be.dataErrors:
				if err == nil {
					t.Fatal("a chunk cut short was taken as a whole message")
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Data did not end")
			}
			if len(be.messages)+len(be.anonmsgs) != 0 {
				t.Fatal("a chunk cut short was stored")
			}
		})
	}
}

// startTLS upgrades a test connection: STARTTLS, the handshake, EHLO.
func startTLS(t *testing.T, c net.Conn, scanner *bufio.Scanner) (net.Conn, *bufio.Scanner) {
	t.Helper()
	io.WriteString(c, "STARTTLS\r\n")
	scanner.Scan()
	if !strings.HasPrefix(scanner.Text(), "220 ") {
		t.Fatalf("STARTTLS: %s", scanner.Text())
	}
	tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true})
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	scanner = bufio.NewScanner(tc)
	io.WriteString(tc, "EHLO localhost\r\n")
	for scanner.Scan() && !strings.HasPrefix(scanner.Text(), "250 ") {
	}
	return tc, scanner
}

// selfSigned is a server configuration with a certificate made for the test.
func selfSigned(t *testing.T) *tls.Config {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "localhost"},
		DNSNames:     []string{"localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
}
