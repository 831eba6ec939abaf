package smtpin

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"sync/atomic"
)

// CertStore holds the server certificate and reloads it from its files,
// so that SIGHUP can renew it while the listeners keep running: handshakes
// after Reload get the new certificate.
type CertStore struct {
	certFile, keyFile string
	cert              atomic.Pointer[tls.Certificate]
}

// LoadCertificate reads a PEM certificate chain and its private key.
func LoadCertificate(certFile, keyFile string) (*CertStore, error) {
	c := &CertStore{certFile: certFile, keyFile: keyFile}
	if err := c.Reload(); err != nil {
		return nil, err
	}
	return c, nil
}

// Reload reads the files again. On error the certificate in use stays.
func (c *CertStore) Reload() error {
	cert, err := tls.LoadX509KeyPair(c.certFile, c.keyFile)
	if err != nil {
		return fmt.Errorf("load TLS certificate %s with key %s: %w", c.certFile, c.keyFile, err)
	}
	if cert.Leaf == nil {
		if cert.Leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return fmt.Errorf("load TLS certificate %s: %w", c.certFile, err)
		}
	}
	c.cert.Store(&cert)
	return nil
}

// Leaf is the certificate in use, for logging its names and expiry.
func (c *CertStore) Leaf() *x509.Certificate { return c.cert.Load().Leaf }

// GetCertificate is for tls.Config and Options.GetCertificate.
func (c *CertStore) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return c.cert.Load(), nil
}
