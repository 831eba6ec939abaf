package queue

import (
	"context"
	"io"
	"strconv"
	"time"
)

// Envelope is what a submission hands to Enqueue: the SMTP envelope and the
// DSN and REQUIRETLS parameters that must travel with the message.
type Envelope struct {
	From       string // envelope sender; "" is the null sender <>
	Recipients []RecipientParams
	User       string // authenticated submitter, "" for a trusted network
	ClientAddr string // submitting client's IP address
	// MessageID is the message's Message-ID header field body, angle
	// brackets included, so that logs can be searched by it.
	MessageID string

	Body8Bit   bool   // BODY=8BITMIME (RFC 6152), or 8-bit octets found by Enqueue
	SMTPUTF8   bool   // SMTPUTF8 (RFC 6531)
	RequireTLS bool   // MAIL FROM … REQUIRETLS (RFC 8689)
	Ret        string // DSN RET: "FULL", "HDRS" or "" (RFC 3461 §4.3)
	EnvID      string // DSN ENVID, xtext-decoded (RFC 3461 §4.4)
	// NoTLSPolicy is set when the message has a "TLS-Required: No" header
	// and no REQUIRETLS: MTA-STS and DANE are not enforced for it, though
	// STARTTLS is still tried (RFC 8689 §5).
	NoTLSPolicy bool
	// TLSReport marks an RFC 8460 report that stsrelay sends itself: its
	// delivery sessions are not counted in the next report (RFC 8460 §3).
	TLSReport bool
	// OwnDSN marks a delivery status notification this queue wrote: the
	// one message delivery may re-encode (SevenBitDSN), for a host
	// without 8BITMIME.
	OwnDSN bool
}

// RecipientParams is one RCPT TO with its DSN parameters.
type RecipientParams struct {
	Addr   string
	Notify []string // NEVER, or any of SUCCESS, FAILURE, DELAY (RFC 3461 §4.1); nil = not given
	// ORcpt is the ORCPT address type and xtext-decoded address,
	// "rfc822;user+tag@example.com" (RFC 3461 §4.2).
	ORcpt string
}

// State is where one recipient of a message stands.
type State string

const (
	StateQueued    State = "queued"    // waiting for its first attempt
	StateDeferred  State = "deferred"  // an attempt failed temporarily; retry later
	StateHeld      State = "held"      // an operator put it on hold
	StateDelivered State = "delivered" // a remote server accepted it
	StateFailed    State = "failed"    // permanently failed; a DSN was queued if allowed
)

// Final reports whether nothing more will happen to a recipient in s.
func (s State) Final() bool { return s == StateDelivered || s == StateFailed }

// Status is the outcome of one attempt for one recipient: what the queue
// shows, what logs say and what a DSN carries (docs/DESIGN.md, "What deferrals
// say").
type Status struct {
	Code      int    // SMTP reply code: 250, 451, 550, …
	Enhanced  string // enhanced status code (RFC 3463): "4.4.8"
	Text      string // a line a person can act on; includes the host when one was involved
	RemoteMTA string // MX host name that gave the reply, "" when the reply is our own
	// Reply is the remote's reply as received, on one line ("550 5.1.1
	// user unknown"); "" when the status is our own decision. A DSN's
	// Diagnostic-Code carries it (RFC 3464 §2.3.6).
	Reply string
	// Relayed is set on success when NOTIFY could not be passed on (the
	// next hop lacks DSN), so NOTIFY=SUCCESS is answered with a "relayed"
	// DSN (RFC 3461 §5.2.2). A success without it sends no DSN: a
	// DSN-capable next hop that got NOTIFY owns the notice (§5.2.1).
	Relayed bool
}

// Delivered reports whether the remote accepted the recipient.
func (s Status) Delivered() bool { return s.Code >= 200 && s.Code < 300 }

// Permanent reports whether retrying cannot help (a 5xx).
func (s Status) Permanent() bool { return s.Code >= 500 }

func (s Status) String() string {
	// Logged for every recipient of every attempt: one allocation, no fmt.
	var buf [20]byte
	code := strconv.AppendInt(buf[:0], int64(s.Code), 10)
	if s.Enhanced == "" {
		return string(code) + " " + s.Text
	}
	return string(code) + " " + s.Enhanced + " " + s.Text
}

// Job is one delivery attempt: the due recipients of one message at one
// destination domain, so that one SMTP transaction can carry them all.
type Job struct {
	ID         string // queue id, for logs
	Domain     string // destination domain, lower-case (A-label for IDNs)
	Envelope   Envelope
	Recipients []RecipientParams // due recipients at Domain, with their DSN parameters
	Size       int64
	Arrived    time.Time
	Attempt    int // 1 for the first attempt of any of these recipients
	// Open returns the stored message (headers and body, CRLF line ends).
	Open func() (io.ReadCloser, error)
	// Throttle is the Deliverer's way to tell the scheduler that the
	// destination asked us to slow down (a 421 greeting, "too many
	// connections"): for the next d, at most limit deliveries to Domain
	// run at once, so the domain's other messages wait in the queue
	// instead of in workers. Signals may arrive out of the order they were
	// computed in; the lowest limit still in force applies, so a later
	// higher one does not undo it. Nil is allowed: there is no one to tell.
	Throttle func(limit int, d time.Duration)
}

// Deliverer attempts jobs. The queue asks for it; delivery implements it.
type Deliverer interface {
	// Deliver returns one Status per job recipient, in the same order. It
	// must return when ctx is done, deferring what it could not finish.
	Deliver(ctx context.Context, job *Job) []Status
}
