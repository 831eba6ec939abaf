// Package testpki issues certificates from a throwaway CA for tests: valid,
// expired, wrong-name and self-signed server certificates, and the pool
// that trusts them.
package testpki

import (
	"cmp"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// CA is a test certificate authority.
type CA struct {
	Cert *x509.Certificate
	key  *ecdsa.PrivateKey
	// Pool trusts exactly this CA.
	Pool *x509.CertPool
}

// NewCA creates a CA valid from an hour ago for a day.
func NewCA(t testing.TB) *CA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(t),
		Subject:               pkix.Name{CommonName: "stsrelay test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(2 * 365 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &CA{Cert: cert, key: key, Pool: pool}
}

// Options vary an issued certificate.
type Options struct {
	Expired    bool   // NotAfter in the past
	CommonName string // subject CN; SANs come from the names argument
	SelfSigned bool   // signed by its own key, not the CA
	// ValidFor is the time left until NotAfter; 0 means 90 days, as a
	// public CA would issue.
	ValidFor time.Duration
}

// Issue returns a server certificate with the given DNS names (IP
// addresses among them become IP SANs).
func (ca *CA) Issue(t testing.TB, names ...string) tls.Certificate {
	t.Helper()
	return ca.IssueWith(t, Options{}, names...)
}

// IssueWith is Issue with options.
func (ca *CA) IssueWith(t testing.TB, opt Options, names ...string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(t),
		Subject:      pkix.Name{CommonName: opt.CommonName},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(cmp.Or(opt.ValidFor, 90*24*time.Hour)),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if opt.Expired {
		tmpl.NotBefore = time.Now().Add(-48 * time.Hour)
		tmpl.NotAfter = time.Now().Add(-24 * time.Hour)
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	parent, signer := ca.Cert, ca.key
	if opt.SelfSigned {
		parent, signer = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, signer)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

// WithChain returns cert with the CA's certificate after the leaf, as a
// server sends its chain (DANE-TA needs the trust anchor in it).
func (ca *CA) WithChain(cert tls.Certificate) tls.Certificate {
	cert.Certificate = append(append([][]byte(nil), cert.Certificate...), ca.Cert.Raw)
	return cert
}

// TLSA returns the TLSA record data "usage selector matching hex" that
// matches c (RFC 6698 §2.1): selector 0 is the whole certificate, 1 its
// SubjectPublicKeyInfo; matching type 0 is the data itself, 1 SHA-256,
// 2 SHA-512.
func TLSA(c *x509.Certificate, usage, selector, matching uint8) string {
	data := c.Raw
	if selector == 1 {
		data = c.RawSubjectPublicKeyInfo
	}
	switch matching {
	case 1:
		h := sha256.Sum256(data)
		data = h[:]
	case 2:
		h := sha512.Sum512(data)
		data = h[:]
	}
	return fmt.Sprintf("%d %d %d %x", usage, selector, matching, data)
}

// WriteFiles writes cert (PEM chain) and key (PKCS#8 PEM) into dir and
// returns their paths, for code that loads certificates from files.
func WriteFiles(t testing.TB, dir string, cert tls.Certificate) (certFile, keyFile string) {
	t.Helper()
	certFile = filepath.Join(dir, "cert.pem")
	keyFile = filepath.Join(dir, "key.pem")
	var chain []byte
	for _, der := range cert.Certificate {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(certFile, chain, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile
}

// WriteCAFile writes the CA certificate as PEM and returns its path, for
// SSL_CERT_FILE.
func (ca *CA) WriteCAFile(t testing.TB, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: ca.Cert.Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func serial(t testing.TB) *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		t.Fatal(err)
	}
	return n
}
