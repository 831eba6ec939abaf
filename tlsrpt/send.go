package tlsrpt

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/http"
	"net/textproto"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/emersion/go-msgauth/dkim"

	"github.com/stsrelay/stsrelay/queue"
)

// DKIMKey is one [[dkim]] entry: a private key published at
// selector._domainkey.domain.
type DKIMKey struct {
	Domain   string
	Selector string
	Signer   crypto.Signer
}

// LoadDKIMKey reads a PEM private key: RSA (PKCS #1 or PKCS #8, at least
// 1024 bits, RFC 8301 §3.2) or Ed25519 (PKCS #8, RFC 8463).
func LoadDKIMKey(path string) (crypto.Signer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("%s: no PEM private key", path)
	}
	var key any
	switch block.Type {
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("%s: PEM block %q is not a private key (want RSA PRIVATE KEY or PRIVATE KEY)", path, block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	switch k := key.(type) {
	case *rsa.PrivateKey:
		if k.N.BitLen() < 1024 {
			return nil, fmt.Errorf("%s: RSA key of %d bits; DKIM verifiers refuse fewer than 1024 (RFC 8301 §3.2)", path, k.N.BitLen())
		}
		return k, nil
	case ed25519.PrivateKey:
		return k, nil
	}
	return nil, fmt.Errorf("%s: %T keys cannot sign DKIM (use RSA or Ed25519)", path, key)
}

// CanSign reports whether a DKIM key covers the report sender's domain;
// without one, mailto: endpoints cannot be served (RFC 8460 §3).
func (t *Reporter) CanSign() bool { return t.signingKey() != nil }

// signingKey is the key for the sender's domain or its closest parent.
func (t *Reporter) signingKey() *DKIMKey {
	_, d, _ := strings.Cut(t.opts.Sender, "@")
	d = strings.ToLower(d)
	var best *DKIMKey
	for i := range t.opts.DKIM {
		k := &t.opts.DKIM[i]
		kd := strings.ToLower(strings.TrimSuffix(k.Domain, "."))
		if (d == kd || strings.HasSuffix(d, "."+kd)) && (best == nil || len(kd) > len(best.Domain)) {
			best = k
		}
	}
	return best
}

// signedHeaders are the fields the DKIM signature covers; RFC 8460 §5.3
// asks for the TLS-Report-* fields to be among them.
var signedHeaders = []string{"From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type",
	"TLS-Report-Domain", "TLS-Report-Submitter", "Auto-Submitted"}

// message builds the RFC 8460 §5.3 report mail, DKIM-signed, CRLF line ends.
func (t *Reporter) message(rep *storedReport, to []string, now time.Time) ([]byte, error) {
	key := t.signingKey()
	if key == nil {
		return nil, fmt.Errorf("no [[dkim]] key for the domain of %s, and RFC 8460 §3 makes receivers ignore unsigned reports", t.opts.Sender)
	}
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	h := textproto.MIMEHeader{}
	// organization_name is free text: UTF-8, quoted-printable, so that the
	// message stays 7-bit and needs no BODY=8BITMIME (RFC 6152).
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("Content-Transfer-Encoding", "quoted-printable")
	pw, _ := mw.CreatePart(h)
	qp := quotedprintable.NewWriter(pw)
	io.WriteString(qp, crlf(t.humanText(rep)))
	qp.Close()
	h = textproto.MIMEHeader{}
	h.Set("Content-Type", "application/tlsrpt+gzip")
	h.Set("Content-Transfer-Encoding", "base64")
	h.Set("Content-Disposition", mime.FormatMediaType("attachment",
		map[string]string{"filename": Filename(t.submitter, rep.Domain, rep.Start, rep.End, rep.UID)}))
	pw, _ = mw.CreatePart(h)
	enc := base64.StdEncoding.EncodeToString(rep.Body)
	for len(enc) > 76 {
		io.WriteString(pw, enc[:76]+"\r\n")
		enc = enc[76:]
	}
	io.WriteString(pw, enc+"\r\n")
	mw.Close()

	var msg bytes.Buffer
	hdr := func(k, v string) { msg.WriteString(k + ": " + v + "\r\n") }
	hdr("From", "<"+t.opts.Sender+">")
	hdr("To", "<"+strings.Join(to, ">,\r\n <")+">")
	// RFC 8460 §5.3's Subject, folded between its parts.
	hdr("Subject", "Report Domain: "+rep.Domain+"\r\n Submitter: "+t.submitter+"\r\n Report-ID: <"+rep.ReportID+">")
	hdr("Date", now.Format(time.RFC1123Z))
	hdr("Message-ID", "<"+rep.ReportID+">")
	hdr("TLS-Report-Domain", rep.Domain)
	hdr("TLS-Report-Submitter", t.submitter)
	hdr("Auto-Submitted", "auto-generated") // RFC 3834: no auto-replies
	// RFC 8689 §5: downstream relays, too, deliver it despite TLS failures.
	hdr("TLS-Required", "No")
	hdr("MIME-Version", "1.0")
	hdr("Content-Type", `multipart/report; report-type="tlsrpt";`+"\r\n boundary=\""+mw.Boundary()+"\"")
	msg.WriteString("\r\n")
	msg.WriteString("This is a multipart message in MIME format.\r\n\r\n")
	msg.Write(body.Bytes())

	var signed bytes.Buffer
	err := dkim.Sign(&signed, bytes.NewReader(msg.Bytes()), &dkim.SignOptions{
		Domain:                 key.Domain,
		Selector:               key.Selector,
		Signer:                 key.Signer,
		HeaderCanonicalization: dkim.CanonicalizationRelaxed,
		BodyCanonicalization:   dkim.CanonicalizationRelaxed,
		HeaderKeys:             signedHeaders,
		// go-msgauth never sets l=, as RFC 8460 §3 requires.
	})
	if err != nil {
		return nil, fmt.Errorf("DKIM signing with %s._domainkey.%s: %v", key.Selector, key.Domain, err)
	}
	return signed.Bytes(), nil
}

func (t *Reporter) humanText(rep *storedReport) string {
	what := "an aggregate TLS report"
	if rep.Partial {
		what = "a partial TLS report (the day was not over), sent on request"
	}
	return fmt.Sprintf("This is %s from %s (%s) for %s,\ncovering %s to %s (UTC): %d successful and %d failed TLS sessions.\nThe report is attached as %s (RFC 8460).\n",
		what, t.submitter, t.opts.OrganizationName, rep.Domain,
		rep.Start.UTC().Format(time.RFC3339), rep.End.UTC().Format(time.RFC3339), rep.Successful, rep.Failed,
		"application/tlsrpt+gzip")
}

func crlf(s string) string { return strings.ReplaceAll(s, "\n", "\r\n") }

// sendMail queues the report for every mailto endpoint in one message,
// delivered like a "TLS-Required: No" message and marked so that its
// sessions are not reported (RFC 8460 §3).
func (t *Reporter) sendMail(ctx context.Context, rep *storedReport, to []string) error {
	if t.opts.Queue == nil {
		return errors.New("no queue to send report mail through")
	}
	msg, err := t.message(rep, to, t.opts.Now())
	if err != nil {
		return err
	}
	env := queue.Envelope{From: t.opts.Sender, NoTLSPolicy: true, TLSReport: true}
	for _, a := range to {
		env.Recipients = append(env.Recipients, queue.RecipientParams{Addr: a})
	}
	// An address with a UTF-8 local part (domains are A-labels) needs
	// SMTPUTF8 (RFC 6531 §3.4), and puts UTF-8 in From: or To: (RFC 6532).
	env.Body8Bit = !ascii(string(msg))
	env.SMTPUTF8 = !ascii(t.opts.Sender) || slices.ContainsFunc(to, func(a string) bool { return !ascii(a) })
	id, err := t.opts.Queue.Enqueue(ctx, env, bytes.NewReader(msg))
	if err != nil {
		return err
	}
	t.log.Info("tlsrpt: report queued", "domain", rep.Domain, "report_id", rep.ReportID, "id", id, "to", strings.Join(to, ","))
	return nil
}

// maxReplyBody bounds what is read of an https endpoint's answer.
const maxReplyBody = 64 << 10

// post sends the report to one https endpoint (RFC 8460 §5.4).
func (t *Reporter) post(ctx context.Context, rep *storedReport, url string) error {
	ctx, cancel := context.WithTimeout(ctx, t.opts.HTTPTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(rep.Body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/tlsrpt+gzip")
	req.Header.Set("User-Agent", "stsrelay")
	resp, err := t.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	reply, _ := io.ReadAll(io.LimitReader(resp.Body, maxReplyBody))
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		// RFC 8460 §5.4: a "successful" response; 202 and 204 are that too.
		return nil
	case resp.StatusCode >= 300 && resp.StatusCode < 400:
		return fmt.Errorf("HTTP %s: redirect to %q not followed", resp.Status, truncate(resp.Header.Get("Location"), 100))
	}
	return fmt.Errorf("HTTP %s: %s", resp.Status, truncate(oneLine(string(reply)), 100))
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// newHTTPClient builds the client for https reports: addresses from the
// configured resolver, TLS 1.2+, no redirects, no proxy, no cookies, and
// bounded headers; the caller bounds each request's time.
func newHTTPClient(opts *Options) *http.Client {
	tr := &http.Transport{
		// An endpoint's addresses are tried in turn, each with a share of
		// the time: an unreachable IPv6 address leaves time for IPv4.
		DialContext:     opts.Resolver.Dialer(opts.DialContext, opts.HTTPTimeout),
		TLSClientConfig: &tls.Config{RootCAs: opts.RootCAs, MinVersion: tls.VersionTLS12},
		// Dials go on detached from the request, so they need a bound of
		// their own. No ResponseHeaderTimeout: post's context already
		// bounds the wait, and a second timer of the same length only
		// races it, naming one timeout two ways.
		TLSHandshakeTimeout:    opts.HTTPTimeout,
		DisableKeepAlives:      true,
		MaxResponseHeaderBytes: 16 << 10,
	}
	return &http.Client{
		Transport:     tr,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// newUID is the report's unique-id (RFC 8460 §5.1: letters and digits).
func newUID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// ascii reports whether s is 7-bit.
func ascii(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}
