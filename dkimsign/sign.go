package dkimsign

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/mail"
	"slices"
	"strings"
	"sync"

	"github.com/emersion/go-msgauth/dkim"

	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/routing"
)

// Key is one [[dkim]] entry with sign_relayed: a private key published at
// Selector._domainkey.Domain.
type Key struct {
	Domain   string // lower-case, no trailing dot
	Selector string
	Signer   crypto.Signer // RSA (rsa-sha256) or Ed25519 (ed25519-sha256, RFC 8463)
}

// maxHeaderBytes bounds the header section read to find From: and
// existing signatures; smtpin refuses larger ones at submission.
const maxHeaderBytes = 512 << 10

// headerKeys are the fields the signature covers (RFC 6376 §5.4.1). The
// fields a reader sees (From, To, Cc, Subject, Reply-To; each at most once,
// RFC 5322 §3.6) are listed twice: the second, absent instance signs its
// absence, so that no second one can be added on the way, above the
// first, where mail programs show it and verifiers do not look
// (oversigning, RFC 6376 §5.4.2, §8.15).
var headerKeys = []string{"From", "From", "To", "To", "Cc", "Cc", "Subject", "Subject", "Date", "Message-ID",
	"MIME-Version", "Content-Type", "Content-Transfer-Encoding", "Reply-To", "Reply-To", "In-Reply-To", "References"}

// Options configures a Signer.
type Options struct {
	// Keys sign by From: domain. Every key of the closest domain signs:
	// an RSA key beside an Ed25519 one, since a receiver that does not
	// know ed25519-sha256 (RFC 8463) takes that signature for none.
	Keys []Key
	// SenderAllowed reports whether the login user may use address as its
	// sender: smtpin's rule for MAIL FROM, as it stands now. Mail from a
	// login (Envelope.User) is signed only when its From: passes, so that
	// a login cannot get a domain's signature, and DMARC pass, for an
	// address it may not send as. Nil: mail from logins is not signed.
	SenderAllowed func(user, address string) bool
	Logger        *slog.Logger
}

// Signer signs relayed mail. The zero value and nil sign nothing.
type Signer struct {
	keys          []Key
	senderAllowed func(user, address string) bool
	log           *slog.Logger
}

// New returns a Signer for opts.Keys.
func New(opts Options) (*Signer, error) {
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	keys := slices.Clone(opts.Keys)
	seen := map[string]bool{}
	for i, k := range keys {
		d := strings.ToLower(strings.TrimSuffix(k.Domain, "."))
		if d == "" || k.Selector == "" || k.Signer == nil {
			return nil, fmt.Errorf("dkimsign: key %d lacks a domain, selector or private key", i)
		}
		name := strings.ToLower(k.Selector) + "._domainkey." + d
		if seen[name] {
			return nil, fmt.Errorf("dkimsign: two keys named %s", name)
		}
		seen[name] = true
		keys[i].Domain = d
	}
	allowed := opts.SenderAllowed
	if allowed == nil {
		allowed = func(string, string) bool { return false }
	}
	return &Signer{keys: keys, senderAllowed: allowed, log: logger}, nil
}

// Wrap returns a Deliverer that signs what it hands to d.
func (s *Signer) Wrap(d queue.Deliverer) queue.Deliverer {
	if s == nil || len(s.keys) == 0 {
		return d
	}
	return deliverer{s: s, next: d}
}

type deliverer struct {
	s    *Signer
	next queue.Deliverer
}

func (w deliverer) Deliver(ctx context.Context, job *queue.Job) []queue.Status {
	if job.Open != nil && job.Envelope.From != "" && !job.Envelope.TLSReport {
		j := *job
		a := &attempt{open: job.Open}
		j.Open = func() (io.ReadCloser, error) { return w.s.open(&j, a) }
		job = &j
	}
	return w.next.Deliver(ctx, job)
}

// attempt is one delivery attempt's signing. Delivery opens the message
// again for each host or transaction; the decision, its log line and
// count, and the signatures are made at the first open and reused.
type attempt struct {
	open func() (io.ReadCloser, error) // the stored message

	mu      sync.Mutex
	decided bool
	sigs    string // the signatures to put in front; "" sends it as stored
	ending  string // what the stored message lacks at its end, when signed
}

// open opens the stored message with the attempt's signatures in front.
// It returns an error only when the stored message cannot be read.
func (s *Signer) open(job *queue.Job, a *attempt) (io.ReadCloser, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.decided {
		if err := s.decide(job, a); err != nil {
			return nil, err
		}
		a.decided = true
	}
	if a.sigs == "" {
		return a.open()
	}
	rc, err := withEnding(a.open, a.ending)
	if err != nil {
		return nil, err
	}
	return readCloser{io.MultiReader(strings.NewReader(a.sigs), rc), rc}, nil
}

// decide sets a's signatures when keys apply to the message, and logs and
// counts what it decided.
func (s *Signer) decide(job *queue.Job, a *attempt) error {
	body, err := a.open()
	if err != nil {
		return err
	}
	rd := &errReader{r: body}
	keys, from, ending, why, malformed := s.pick(rd)
	body.Close()
	if rd.err != nil {
		return fmt.Errorf("reading the message to sign it: %w", rd.err)
	}
	if len(keys) == 0 {
		if malformed && len(s.keysFor(domainOf(job.Envelope.From))) > 0 {
			// The sender's domain has a key, so a signature was most
			// likely expected. Without one From: address there is no
			// domain to sign for, and From: must be signed (RFC 6376
			// §5.4, RFC 5322 §3.6: exactly one).
			metricSigned.WithLabelValues("unsignable").Inc()
			s.log.Warn("dkimsign: not signed: the message's header section has no single From: address to sign for", "id", job.ID,
				"mail_from", job.Envelope.From, "reason", why)
		} else {
			s.log.Debug("dkimsign: not signed", "id", job.ID, "reason", why)
		}
		return nil
	}
	// Trusted networks ("") may send as anyone, as MAIL FROM shows.
	if user := job.Envelope.User; user != "" && !s.senderAllowed(user, from) {
		metricSigned.WithLabelValues("not_allowed").Inc()
		s.log.Warn("dkimsign: not signed: the login may not use the From: address (allowed_senders)", "id", job.ID,
			"user", user, "header_from", from, "key", keys[0].name())
		return nil
	}
	var sigs strings.Builder
	for _, key := range keys {
		sig, err := s.sign(key, func() (io.ReadCloser, error) { return withEnding(a.open, ending) })
		if errors.Is(err, errUnreadable) {
			// Not the key's failure: the attempt's open fails, and the
			// message is tried again later, signed.
			return err
		}
		if err != nil {
			metricSigned.WithLabelValues("failed").Inc()
			s.log.Warn("dkimsign: signing failed, the message goes out without this key's signature", "id", job.ID,
				"key", key.name(), "err", err)
			continue
		}
		sigs.WriteString(sig)
	}
	if sigs.Len() > 0 {
		metricSigned.WithLabelValues("signed").Inc()
		a.sigs, a.ending = sigs.String(), ending
	}
	return nil
}

// name is the key's DNS name, as logs give it.
func (k *Key) name() string { return k.Selector + "._domainkey." + k.Domain }

// withEnding opens the message with ending after it: the empty line that
// ends a header section of a message without a body (RFC 5322 §3.5 lets
// both go), which the signer needs to find the header's end, and which
// then goes out as signed.
func withEnding(open func() (io.ReadCloser, error), ending string) (io.ReadCloser, error) {
	rc, err := open()
	if err != nil || ending == "" {
		return rc, err
	}
	return readCloser{io.MultiReader(rc, strings.NewReader(ending)), rc}, nil
}

// errUnreadable is a failure to read the stored message, which is no
// reason to send it unsigned.
var errUnreadable = errors.New("reading the message to sign it")

// errReader keeps the first error other than EOF that reading r gave.
type errReader struct {
	r   io.Reader
	err error
}

func (e *errReader) Read(p []byte) (int, error) {
	n, err := e.r.Read(p)
	if err != nil && err != io.EOF && e.err == nil {
		e.err = err
	}
	return n, err
}

type readCloser struct {
	io.Reader
	io.Closer
}

// sign streams the whole message through the DKIM signer and returns the
// DKIM-Signature field, CRLF included.
func (s *Signer) sign(key *Key, open func() (io.ReadCloser, error)) (string, error) {
	rc, err := open()
	if err != nil {
		return "", fmt.Errorf("%w: %w", errUnreadable, err)
	}
	defer rc.Close()
	rd := &errReader{r: rc}
	signer, err := dkim.NewSigner(&dkim.SignOptions{
		Domain:                 key.Domain,
		Selector:               key.Selector,
		Signer:                 key.Signer,
		HeaderCanonicalization: dkim.CanonicalizationRelaxed,
		BodyCanonicalization:   dkim.CanonicalizationRelaxed,
		HeaderKeys:             headerKeys,
		// go-msgauth never sets l=: a body length limit would let anyone
		// append to a signed message (RFC 6376 §8.2).
	})
	if err != nil {
		return "", err
	}
	if _, err := io.Copy(signer, rd); err != nil {
		signer.Close()
		if rd.err != nil {
			return "", fmt.Errorf("%w: %w", errUnreadable, rd.err)
		}
		return "", err
	}
	if err := signer.Close(); err != nil {
		return "", err
	}
	return signer.Signature(), nil
}

// pick reads the header section of the message and returns the keys that
// should sign it with the From: address and what the message lacks at its
// end ("\r\n" for a message of header fields only), or none and why not;
// malformed says the reason is the message's header, not the keys.
func (s *Signer) pick(r io.Reader) (keys []*Key, from, ending, why string, malformed bool) {
	hdr, ended, err := readHeader(r)
	if err != nil {
		return nil, "", "", err.Error(), errors.Is(err, errHeaderTooLarge)
	}
	if !ended {
		ending = "\r\n"
	}
	m, err := mail.ReadMessage(bytes.NewReader(hdr))
	if err != nil {
		return nil, "", "", "unparsable header: " + err.Error(), true
	}
	froms := m.Header["From"]
	if len(froms) != 1 {
		return nil, "", "", fmt.Sprintf("%d From: fields", len(froms)), true
	}
	addrs, err := fromParser.ParseList(froms[0])
	if err != nil {
		return nil, "", "", "unparsable From: " + err.Error(), true
	}
	if len(addrs) != 1 {
		return nil, "", "", fmt.Sprintf("From: names %d addresses", len(addrs)), true
	}
	from = addrs[0].Address
	domain := domainOf(from)
	if domain == "" {
		return nil, "", "", "From: address has no domain", true
	}
	all := s.keysFor(domain)
	if len(all) == 0 {
		return nil, "", "", "no key for " + domain, false
	}
	for _, k := range all {
		signed := slices.ContainsFunc(m.Header["Dkim-Signature"], func(v string) bool {
			d, sel := sigTags(v)
			return strings.EqualFold(d, k.Domain) && strings.EqualFold(sel, k.Selector)
		})
		if !signed {
			keys = append(keys, k)
		}
	}
	if len(keys) == 0 {
		return nil, "", "", "already signed by " + all[0].name(), false
	}
	return keys, from, ending, "", false
}

// fromParser reads From: for its address alone. net/mail decodes only
// utf-8, iso-8859-1 and us-ascii encoded-words (RFC 2047) and fails on
// any other charset; the display name's bytes are passed through instead,
// since no display name changes which key signs.
var fromParser = mail.AddressParser{WordDecoder: &mime.WordDecoder{
	CharsetReader: func(_ string, input io.Reader) (io.Reader, error) { return input, nil },
}}

// domainOf returns the domain of addr as keys name theirs, in the one
// form submission compares allowed_senders in (routing.ALabels): "" without
// one, or when it is no IDNA name. A From: of RFC 6532 mail may hold
// U-labels.
func domainOf(addr string) string {
	at := strings.LastIndexByte(addr, '@')
	if at < 0 {
		return ""
	}
	return routing.ALabels(addr[at+1:])
}

// keysFor returns the keys of domain, or of its closest parent that has
// any.
func (s *Signer) keysFor(domain string) []*Key {
	var best []*Key
	for i := range s.keys {
		k := &s.keys[i]
		if domain != k.Domain && !strings.HasSuffix(domain, "."+k.Domain) {
			continue
		}
		switch {
		case len(best) == 0 || len(k.Domain) > len(best[0].Domain):
			best = []*Key{k}
		case k.Domain == best[0].Domain:
			best = append(best, k)
		}
	}
	return best
}

// sigTags returns the d= and s= tags of a DKIM-Signature field body
// (RFC 6376 §3.5; whitespace may appear anywhere in a tag list, §3.2).
func sigTags(v string) (d, s string) {
	for _, tag := range strings.Split(v, ";") {
		name, val, ok := strings.Cut(tag, "=")
		if !ok {
			continue
		}
		val = strings.Join(strings.Fields(val), "")
		switch strings.TrimSpace(name) {
		case "d":
			d = strings.TrimSuffix(val, ".")
		case "s":
			s = val
		}
	}
	return d, s
}

var errHeaderTooLarge = errors.New("header section too large")

// readHeader returns the header section and the empty line after it,
// reading at most maxHeaderBytes; ended says the message has that line.
func readHeader(r io.Reader) (_ []byte, ended bool, _ error) {
	br := bufio.NewReader(io.LimitReader(r, maxHeaderBytes))
	var buf bytes.Buffer
	partial := false // the last piece read did not end a line
	for {
		line, err := br.ReadSlice('\n')
		buf.Write(line)
		switch {
		case errors.Is(err, bufio.ErrBufferFull):
			partial = true
			continue
		case err == io.EOF:
			if buf.Len() >= maxHeaderBytes {
				return nil, false, errHeaderTooLarge
			}
			buf.WriteString("\r\n") // a message of header fields only
			return buf.Bytes(), false, nil
		case err != nil:
			return nil, false, fmt.Errorf("reading the header: %w", err)
		}
		if !partial && (string(line) == "\r\n" || string(line) == "\n") {
			return buf.Bytes(), true, nil
		}
		partial = false
	}
}
